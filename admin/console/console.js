// ecwid-events console: one plain module, no build step, no dependencies.
// It only calls the admin API documented in /openapi.json, with the token kept in sessionStorage
// (this tab only; never a cookie, never the URL). Every value from the API is put on the page as
// text (textContent), never as HTML.

const TOKEN_KEY = 'ecwid-events.token';
const SECRET = '********';
const STATUSES = ['pending', 'retrying', 'delivered', 'dead', 'filtered'];
// The seed's instance configuration, in the order a person fills it in.
const CONFIG_KEYS = [
  ['ecwid.store.id', 'Store id'],
  ['event.notification.callback.url', 'Callback URL'],
  ['event.notification.enabled', 'Notifications enabled (true/false)'],
  ['ecwid.order.key', 'Order key (secret)'],
  ['ecwid.product.key', 'Product key (secret)'],
  ['ecwid.client.secret', 'Ecwid app client secret (secret)'],
  ['event.notification.signature.key', 'Signature key (secret)'],
  ['event.notification.webhook.secret', 'Standard Webhooks secret whsec_… (secret)'],
  ['event.objects', 'Object types to deliver (comma-separated, empty = all)'],
  ['event.notification.filter', 'Filter: CEL expression over the envelope, e.g. raw.data.newPaymentStatus == \'PAID\' (empty = every event)'],
  ['event.notification.headers', 'Custom headers: JSON object {"X-Api-Key":"…"} (values secret)'],
  ['event.notification.proxy.url', 'Outbound proxy URL, scheme http or https, [user:password@]host:port (overrides DELIVER_PROXY_URL)'],
  ['event.notification.tls.client.certificate', 'Client certificate, PEM (secret)', 'pem'],
  ['event.notification.tls.client.key', 'Client certificate key, PEM (secret)', 'pem'],
  ['event.notification.tls.ca', 'CA certificates to trust for this receiver, PEM', 'pem'],
  ['event.notification.oauth2.token.url', 'OAuth2 token endpoint URL'],
  ['event.notification.oauth2.client.id', 'OAuth2 client id'],
  ['event.notification.oauth2.client.secret', 'OAuth2 client secret (secret)'],
  ['event.notification.oauth2.scope', 'OAuth2 scope'],
  ['event.notification.oauth2.audience', 'OAuth2 audience'],
];

const $ = (id) => document.getElementById(id);
let role = null; // 'admin' | 'read' once signed in

// ---------- small DOM helpers ----------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const badge = (status) => h('span', { class: `badge s-${status}` }, status);
const dash = (v) => (v === undefined || v === null || v === '' ? '—' : String(v));
const mono = (v) => h('span', { class: 'mono' }, dash(v));

function table(caption, headers, rows, empty) {
  if (!rows.length) return h('p', { class: 'empty' }, empty);
  return h('div', { class: 'table-wrap' },
    h('table', {},
      h('caption', { class: 'skip' }, caption),
      h('thead', {}, h('tr', {}, headers.map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, rows.map((cells) => h('tr', {}, cells.map((c) => h('td', {}, c)))))));
}

function facts(pairs) {
  return h('dl', { class: 'facts' }, pairs.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v instanceof Node ? v : dash(v))]));
}

function setStatus(text) { $('status').textContent = text; }

function render(...nodes) {
  const view = $('view');
  // Sections left out (`isAdmin() && …` for a reader) are false: not shown, not as text.
  view.replaceChildren(...nodes.flat().filter((n) => n !== false && n !== null && n !== undefined));
}

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, body) {
    const code = body && body.error ? body.error : `HTTP ${status}`;
    const msg = body && body.message ? body.message : 'no explanation came back';
    super(`${status} ${code}: ${msg}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const init = { method, headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { error: 'network', message: `the admin listener could not be reached (${e.message})` });
  }
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = { error: `HTTP ${res.status}`, message: text.slice(0, 500) }; }
  if (res.status === 401) { signOut('The token was refused: ' + ((json && json.message) || 'unauthorized')); throw new ApiError(401, json); }
  if (!res.ok) throw new ApiError(res.status, json);
  return { status: res.status, body: json };
}

// ---------- confirmations and answers ----------

function confirmAction(text, okLabel = 'Go ahead') {
  const dialog = $('confirm');
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = okLabel;
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.showModal();
  });
}

// The server's answer, as sentences a person reads, with the JSON underneath.
function answer(title, ok, lines, json) {
  const box = h('div', { class: `result${ok ? '' : ' bad'}`, role: ok ? 'status' : 'alert', 'data-testid': 'result' },
    h('p', {}, h('strong', {}, title)),
    lines.map((l) => h('p', {}, l)),
    json !== undefined ? h('details', {}, h('summary', {}, 'Server answer (JSON)'), h('pre', {}, JSON.stringify(json, null, 2))) : null);
  return box;
}

async function act({ confirm, okLabel, run, describe, target }) {
  if (!(await confirmAction(confirm, okLabel))) return;
  setStatus('Working…');
  let box;
  try {
    const { status, body } = await run();
    box = answer(`Done (HTTP ${status})`, true, describe(body, status), body);
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    box = answer('The server refused', false, [e.message], e.body);
  }
  setStatus('');
  target.replaceChildren(box);
  box.focus?.();
}

const isAdmin = () => role === 'admin';

// ---------- instances ----------

function callbackOf(i) { return (i.configuration || {})['event.notification.callback.url']; }
function enabledOf(i) { return String((i.configuration || {})['event.notification.enabled']) === 'true'; }

// How an instance came to be: made by an operator, or by a merchant's install of the Ecwid app.
function provenance(i) {
  if (i.provisionedBy !== 'app') return 'made by an operator';
  const app = i.app || {};
  if (app.purgedAt) return `app: uninstalled ${app.uninstalledAt}, data purged ${app.purgedAt}`;
  if (app.uninstalledAt) return `app: uninstalled ${app.uninstalledAt}${app.purgeDueAt ? `, purge due ${app.purgeDueAt}` : ''}`;
  return `app: installed ${dash(app.installedAt)}`;
}

async function instancesView() {
  const { body } = await api('GET', '/instances');
  const out = h('div', { id: 'instance-result' });
  const rows = body.instances.map((i) => [
    h('span', {}, dash(i.name), h('br'), h('span', { class: 'mono' }, i.id), h('br'),
      h('span', { class: 'muted' }, provenance(i))),
    mono((i.configuration || {})['ecwid.store.id']),
    mono(callbackOf(i)),
    enabledOf(i) ? badge('on') : badge('off'),
    badge(i.state || 'active'),
    dash((i.tags || []).filter(Boolean).join(', ')),
    h('div', { class: 'actions' },
      h('a', { href: `#/instances/${encodeURIComponent(i.id)}/health` }, 'Health'),
      h('a', { href: `#/events?instance=${encodeURIComponent(i.id)}` }, 'Events'),
      h('a', { href: `#/dead-letters?instance=${encodeURIComponent(i.id)}` }, 'Dead letters'),
      isAdmin() && h('a', { href: `#/instances/${encodeURIComponent(i.id)}/edit` }, 'Edit'),
      isAdmin() && h('button', { type: 'button', class: 'secondary', onclick: () => testInstance(i, out) }, 'Send test event'),
      isAdmin() && h('button', { type: 'button', class: 'secondary', onclick: () => replayForm(i, out) }, 'Replay window…'),
      isAdmin() && pauseResumeButton(i, out)),
  ]);
  render(
    h('h1', {}, 'Instances'),
    h('p', { class: 'muted' }, '"Notifications" is the instance\'s event.notification.enabled setting. "State" is where its events go: active (delivered), paused (held by an operator), disabled (held after its callback failed for DELIVER_DISABLE_AFTER). Held events spend no attempt and are delivered after Resume: put back oldest first, but an unordered instance\'s events may then arrive in any order, among new ones; only an ordered instance (event.notification.ordered) keeps their order.'),
    isAdmin() && h('div', { class: 'actions' }, h('a', { href: '#/instances/new' }, h('span', {}, 'New instance'))),
    out,
    table('Instances', ['Name', 'Store', 'Callback', 'Notifications', 'State', 'Tags', 'Actions'], rows, 'No instances yet.'),
  );
}

// Pause for an active instance, Resume for a paused or disabled one.
function pauseResumeButton(i, out, after) {
  const held = (i.state || 'active') !== 'active';
  return h('button', { type: 'button', class: 'secondary', onclick: () => act({
    target: out,
    confirm: held
      ? `Resume instance "${dash(i.name)}"? Its held events are delivered to ${dash(callbackOf(i))}: put back oldest first, and in order only if the instance is ordered; otherwise they may arrive in any order, among new ones.`
      : `Pause instance "${dash(i.name)}"? Its events are held (no attempt spent, nothing dropped) until you resume it.`,
    okLabel: held ? 'Resume' : 'Pause',
    run: () => api('POST', `/instances/${encodeURIComponent(i.id)}/${held ? 'resume' : 'pause'}`),
    describe: (b) => {
      i.state = b.state;
      if (after) after();
      return [
        b.state === 'active' ? `Resumed: instance ${b.id} is active since ${b.since}.` : `Paused: instance ${b.id} is paused since ${b.since}.`,
        b.state === 'active' ? `${b.held} held event(s) are being released for delivery.` : `${b.held} event(s) held so far.`,
        h('a', { href: '#/instances', onclick: () => route() }, 'Back to instances (refreshed)'),
      ];
    },
  }) }, held ? 'Resume…' : 'Pause…');
}

function percent(rate) { return rate === null || rate === undefined ? 'no attempts in the last hour' : `${Math.round(rate * 1000) / 10} %`; }

async function healthView(id) {
  const [{ body: i }, { body: hl }] = await Promise.all([
    api('GET', `/instances/${encodeURIComponent(id)}`),
    api('GET', `/instances/${encodeURIComponent(id)}/health`),
  ]);
  const out = h('div');
  render(
    h('h1', {}, `Health of "${dash(i.name)}"`),
    facts([
      ['State', badge(hl.state)], ['Since', hl.since], ['Reason', hl.reason],
      ['Callback', mono(callbackOf(i))], ['Breaker', badge(hl.breaker)],
      ['Last success', hl.lastSuccessAt], ['Last failure', hl.lastFailureAt],
      ['Consecutive failures', String(hl.consecutiveFailures)], ['Failing since', hl.failingSince],
      ['Success rate (1 h)', percent(hl.successRate1h)], ['Last error', hl.lastError],
      ['Backlog (not yet taken, or held)', String(hl.backlog)], ['Held', String(hl.held)],
      ['Retrying', String(hl.retrying)], ['Dead letters', String(hl.dead)],
      ['Client certificate expires', hl.clientCertificateExpiresAt],
      ['Provisioned by', i.provisionedBy === 'app' ? 'the Ecwid app (a merchant\'s install)' : 'an operator (admin API)'],
      ...(i.provisionedBy === 'app' ? [
        ['Installed', (i.app || {}).installedAt], ['Uninstalled', (i.app || {}).uninstalledAt],
        ['Purge due', (i.app || {}).purgeDueAt], ['Purged', (i.app || {}).purgedAt],
        ['Subscription', (i.app || {}).subscriptionStatus],
      ] : []),
    ]),
    h('p', { class: 'muted' }, 'Breaker, failures, last success and success rate belong to the callback URL, shared by every deliverer replica (and every instance with that URL).'),
    h('div', { class: 'actions' },
      h('a', { href: `#/events?instance=${encodeURIComponent(id)}` }, 'Events'),
      h('a', { href: `#/dead-letters?instance=${encodeURIComponent(id)}` }, 'Dead letters'),
      isAdmin() && pauseResumeButton(i, out),
      isAdmin() && h('button', { type: 'button', class: 'secondary', onclick: () => testInstance(i, out) }, 'Send test event')),
    out,
  );
}

function testInstance(i, out) {
  return act({
    target: out,
    confirm: `Send a test event (objectType "test") to ${dash(callbackOf(i))} for instance "${dash(i.name)}" now? It is tried once and waits up to 45 s for the answer.`,
    okLabel: 'Send test event',
    run: () => api('POST', `/instances/${encodeURIComponent(i.id)}/test`),
    describe: (b) => [
      b.delivered ? `Delivered: the callback answered ${dash(b.status)} in ${dash(b.durationMs)} ms.`
        : `Not delivered: ${dash(b.status || b.error)}${b.error && b.status ? ` (${b.error})` : ''}, after ${dash(b.durationMs)} ms.`,
      b.response ? `Response: ${b.response}` : 'The response body was empty.',
      `Test event id: ${dash(b.eventId)}`,
    ],
  });
}

function isoLocal(d) { const p = (n) => String(n).padStart(2, '0'); return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`; }
function toRfc3339(local) { return local ? new Date(local).toISOString() : undefined; }

function replayForm(i, out) {
  const now = new Date();
  const since = h('input', { type: 'datetime-local', id: 'replay-since', required: true, value: isoLocal(new Date(now - 3600e3)) });
  const until = h('input', { type: 'datetime-local', id: 'replay-until', required: true, value: isoLocal(new Date(now.getTime() + 60e3)) });
  const status = h('select', { id: 'replay-status' }, h('option', { value: '' }, 'any'), STATUSES.map((s) => h('option', { value: s }, s)));
  const result = h('div');
  const form = h('form', { class: 'edit', onsubmit: (e) => {
    e.preventDefault();
    const body = { since: toRfc3339(since.value), until: toRfc3339(until.value) };
    if (status.value) body.status = status.value;
    act({
      target: result,
      confirm: `Redeliver every event of "${dash(i.name)}" received between ${since.value} and ${until.value}${status.value ? ` with status ${status.value}` : ''}? Its callback receives them again, oldest first (up to 1000).`,
      okLabel: 'Replay',
      run: () => api('POST', `/instances/${encodeURIComponent(i.id)}/replay`, body),
      describe: (b) => [`${b.replayed.length} event(s) sent again.`, b.failed.length ? `${b.failed.length} failed: ${b.failed.map((f) => `${f.id}: ${f.message}`).join('; ')}` : 'None failed.', b.more ? 'The window holds more: replay again to send the rest.' : 'That was the whole window.'],
    });
  } },
  h('label', { for: 'replay-since' }, 'Received from (local time)', since),
  h('label', { for: 'replay-until' }, 'Received before (local time)', until),
  h('label', { for: 'replay-status' }, 'Only status', status),
  h('div', {}, h('button', { type: 'submit' }, 'Replay window…')));
  out.replaceChildren(h('h2', {}, `Replay a window of "${dash(i.name)}"`), form, result);
  since.focus();
}

async function instanceEditView(id) {
  const existing = id ? (await api('GET', `/instances/${encodeURIComponent(id)}`)).body : null;
  const config = existing ? { ...existing.configuration } : { 'event.notification.enabled': 'true' };
  const keys = [...CONFIG_KEYS];
  for (const k of Object.keys(config)) if (!keys.some(([key]) => key === k)) keys.push([k, k]);
  const name = h('input', { id: 'f-name', value: existing ? existing.name || '' : '' });
  const tags = h('input', { id: 'f-tags', value: existing ? (existing.tags || []).join(', ') : '' });
  const inputs = keys.map(([key, label, kind], n) => {
    // PEM values are several lines: a text area (a masked secret shows as its one-line marker).
    const input = kind === 'pem'
      ? h('textarea', { id: `f-c${n}`, 'data-key': key, rows: config[key] && config[key] !== SECRET ? 6 : 2, autocomplete: 'off', spellcheck: 'false' }, config[key] ?? '')
      : h('input', { id: `f-c${n}`, 'data-key': key, value: config[key] ?? '', autocomplete: 'off' });
    return h('label', { for: `f-c${n}` }, `${label}`, input);
  });
  const result = h('div');
  const form = h('form', { class: 'edit', onsubmit: (e) => {
    e.preventDefault();
    const configuration = {};
    for (const input of form.querySelectorAll('[data-key]')) {
      const key = input.dataset.key;
      const value = input.value.trim();
      if (existing) {
        if (value === '' && key in config) configuration[key] = null; // removes the key
        else if (value !== '' && value !== config[key]) configuration[key] = value;
        // an unchanged value (a masked secret included) is not sent: the stored one stays
      } else if (value !== '') configuration[key] = value;
    }
    const body = { name: name.value.trim(), tags: tags.value.split(',').map((t) => t.trim()).filter(Boolean), configuration };
    if (!existing) body.element = { key: 'ecwid' };
    act({
      target: result,
      confirm: existing ? `Save changes to instance "${dash(existing.name)}"? Changed keys: ${Object.keys(configuration).join(', ') || 'none'}.` : `Create instance "${body.name}" for store ${dash(configuration['ecwid.store.id'])}?`,
      okLabel: existing ? 'Save' : 'Create',
      run: () => (existing ? api('PATCH', `/instances/${encodeURIComponent(id)}`, body) : api('POST', '/instances', body)),
      describe: (b, status) => [status === 201 ? `Created instance ${b.id}.` : `Saved instance ${b.id}.`, 'Secrets are shown masked; the stored values were kept.', h('a', { href: '#/instances' }, 'Back to instances')],
    });
  } },
  h('label', { for: 'f-name' }, 'Name', name),
  h('label', { for: 'f-tags' }, 'Tags (comma-separated)', tags),
  inputs,
  h('div', {}, h('button', { type: 'submit' }, existing ? 'Save…' : 'Create…')));
  render(
    h('h1', {}, existing ? `Edit instance "${dash(existing.name)}"` : 'New instance'),
    h('p', {}, `Secrets come back as ${SECRET}; leave them as they are to keep the stored value, or type a new one. An empty field removes the key.`),
    form, result);
  name.focus();
}

// ---------- events ----------

const EVENT_FILTERS = [
  ['store', 'Store id'], ['instance', 'Instance id'], ['objectType', 'Object type'],
  ['objectId', 'Object id'], ['ecwidEventId', 'Ecwid event id'],
];

function filterForm(fields, params, extra, onSearch) {
  const inputs = fields.map(([name, label]) => {
    const input = h('input', { id: `q-${name}`, name, value: params.get(name) || '' });
    return h('label', { for: `q-${name}` }, label, input);
  });
  const form = h('form', { class: 'filters', role: 'search', onsubmit: (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    for (const el of form.elements) {
      if (!el.name || !el.value) continue;
      q.set(el.name, el.type === 'datetime-local' ? toRfc3339(el.value) : el.value.trim());
    }
    onSearch(q);
  } }, inputs, extra, h('div', {}, h('button', { type: 'submit' }, 'Search')));
  return form;
}

function timeInput(name, label, params) {
  const v = params.get(name);
  const input = h('input', { id: `q-${name}`, name, type: 'datetime-local', value: v ? isoLocal(new Date(v)) : '' });
  return h('label', { for: `q-${name}` }, label, input);
}

async function eventsView(params) {
  const status = h('select', { id: 'q-status', name: 'status' }, h('option', { value: '' }, 'any'),
    STATUSES.map((s) => h('option', { value: s, selected: params.get('status') === s }, s)));
  const form = filterForm(EVENT_FILTERS, params, [
    h('label', { for: 'q-status' }, 'Status', status),
    timeInput('since', 'Received from', params), timeInput('until', 'Received before', params),
  ], (q) => { location.hash = `#/events?${q}`; });
  const { body } = await api('GET', `/events?${params}`);
  const rows = body.events.map((e) => [
    h('a', { href: `#/events/${encodeURIComponent(e.id)}` }, dash(e.receivedAt)),
    badge(e.status), `${dash(e.objectType)} ${dash(e.objectId)}`, dash(e.eventType),
    mono(e.storeId), mono(e.instanceId), dash(e.attempts), dash(e.lastStatus),
  ]);
  const next = body.next ? (() => { const q = new URLSearchParams(params); q.set('after', body.next); return h('a', { href: `#/events?${q}` }, 'Older events →'); })() : null;
  render(h('h1', {}, 'Events'), form,
    table('Events, newest first', ['Received', 'Status', 'Object', 'Event', 'Store', 'Instance', 'Attempts', 'Last answer'], rows, 'No events match.'),
    h('p', {}, next || (params.get('after') ? 'No older events.' : '')));
}

// An attempt's outcome: the HTTP status (green when 2xx) or the error class.
function attemptBadge(a) {
  const ok = a.status >= 200 && a.status < 300;
  return h('span', { class: `badge ${ok ? 's-delivered' : 's-dead'}` }, a.status ? String(a.status) : a.errorClass || 'error');
}

async function eventView(id) {
  const { body } = await api('GET', `/events/${encodeURIComponent(id)}`);
  const e = body.event;
  const result = h('div');
  const attempts = body.attempts || [];
  render(
    h('p', {}, h('a', { href: '#/events' }, '← Events')),
    h('h1', {}, `Event ${e.objectType} ${e.objectId}`),
    facts([['Status', badge(e.status)], ['Id', mono(e.id)], ['Ecwid event id', mono(e.ecwidEventId)], ['Store', mono(e.storeId)],
      ['Instance', mono(e.instanceId)], ['Event type', e.eventType], ['Received', e.receivedAt], ['Attempts', e.attempts],
      ['Last answer', e.lastStatus], ['Last error', e.lastError], ['Next attempt', e.nextAttemptAt], ['Delivered', e.deliveredAt]]),
    isAdmin() && e.instanceId && h('div', { class: 'actions' }, h('button', { type: 'button', onclick: () => act({
      target: result,
      confirm: `Deliver event ${e.id} to its instance's callback again? The same body (same webhook id and signatures), with a fresh attempt budget.`,
      okLabel: 'Redeliver',
      run: () => api('POST', `/events/${encodeURIComponent(e.id)}/redeliver`),
      describe: (b) => [`Redelivery queued; the event is now ${b.status}. New attempts appear below once the deliverer makes them.`, h('button', { type: 'button', class: 'secondary', onclick: () => route() }, 'Refresh')],
    }) }, 'Redeliver…')),
    result,
    h('h2', {}, `Attempts (${attempts.length})`),
    attempts.length ? h('ol', { class: 'timeline', 'aria-label': 'Attempts, oldest first' }, attempts.map((a) => h('li', {},
      h('p', {}, h('strong', {}, `#${a.number}`), ` ${a.startedAt} — `, attemptBadge(a), ` in ${a.durationMs} ms`),
      a.error ? h('p', { class: 'error' }, a.error) : null,
      a.response ? h('pre', {}, a.response) : h('p', { class: 'empty' }, 'No response body.'))))
      : h('p', { class: 'empty' }, 'No attempts recorded yet.'),
    h('h2', {}, 'Envelope as delivered'),
    body.envelope ? h('pre', { 'aria-label': 'Envelope JSON' }, JSON.stringify(body.envelope, null, 2)) : h('p', { class: 'empty' }, 'Not stored (past retention, or no envelope was made).'),
  );
}

// ---------- dead letters ----------

async function deadLettersView(params) {
  const stage = h('select', { id: 'q-stage', name: 'stage' }, h('option', { value: '' }, 'any'),
    ['normalize', 'deliver'].map((s) => h('option', { value: s, selected: params.get('stage') === s }, s)));
  const form = filterForm([['instance', 'Instance id'], ['store', 'Store id']], params, [
    h('label', { for: 'q-stage' }, 'Stage', stage), timeInput('since', 'Dead from', params), timeInput('until', 'Dead before', params),
  ], (q) => { location.hash = `#/dead-letters?${q}`; });
  const { body } = await api('GET', `/dead-letters?${params}`);
  const result = h('div');
  const rows = body.deadLetters.map((d) => [
    h('a', { href: `#/dead-letters/${d.seq}` }, `#${d.seq}`), dash(d.deadAt), dash(d.stage), mono(d.id),
    dash(d.reason), dash(d.lastStatus), dash(d.attempts),
    isAdmin() && h('div', { class: 'actions' }, replayButton(d.seq, result), deleteButton(d.seq, result)),
  ].filter((c) => c !== false));
  const next = body.next ? (() => { const q = new URLSearchParams(params); q.set('after', body.next); return h('a', { href: `#/dead-letters?${q}` }, 'Newer dead letters →'); })() : null;
  render(h('h1', {}, 'Dead letters'), form, result,
    table('Dead letters, oldest first', ['Seq', 'Dead at', 'Stage', 'Instance / store', 'Reason', 'Last answer', 'Attempts', isAdmin() && 'Actions'].filter(Boolean), rows, 'No dead letters match.'),
    h('p', {}, next));
}

function replayButton(seq, target) {
  return h('button', { type: 'button', onclick: () => act({
    target,
    confirm: `Replay dead letter #${seq}? It is sent back to the stage it came from with a fresh attempt budget, then removed from the dead letters.`,
    okLabel: 'Replay',
    run: () => api('POST', '/dead-letters/replay', { seq }),
    describe: (b) => [b.replayed.length ? `Replayed: #${b.replayed.join(', #')}.` : 'Nothing was replayed.',
      ...b.failed.map((f) => `#${f.seq} failed: ${f.error}: ${f.message}`)],
  }) }, 'Replay…');
}

function deleteButton(seq, target) {
  return h('button', { type: 'button', class: 'danger', onclick: () => act({
    target,
    confirm: `Delete dead letter #${seq} for good? It will not be delivered.`,
    okLabel: 'Delete',
    run: () => api('DELETE', `/dead-letters/${seq}`),
    describe: () => [`Dead letter #${seq} deleted.`],
  }) }, 'Delete…');
}

async function deadLetterView(seq) {
  const { body } = await api('GET', `/dead-letters/${encodeURIComponent(seq)}`);
  const result = h('div');
  const { payload, ...rest } = body;
  render(
    h('p', {}, h('a', { href: '#/dead-letters' }, '← Dead letters')),
    h('h1', {}, `Dead letter #${body.seq}`),
    facts(Object.entries(rest).map(([k, v]) => [k, typeof v === 'object' && v !== null ? JSON.stringify(v) : v])),
    isAdmin() && h('div', { class: 'actions' }, replayButton(body.seq, result), deleteButton(body.seq, result)),
    result,
    h('h2', {}, 'Payload'), h('pre', {}, JSON.stringify(payload, null, 2)));
}

// ---------- sign-in and routing ----------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  role = null;
  showSignIn(message || '');
}

function showSignIn(message) {
  $('nav').hidden = true; $('who').hidden = true;
  $('view').replaceChildren();
  $('sign-in').hidden = false;
  $('sign-in-error').textContent = message;
  $('token').value = '';
  $('token').focus();
}

async function learnRole() {
  const { body } = await api('GET', '/whoami');
  role = body.role;
  $('sign-in').hidden = true;
  $('nav').hidden = false; $('who').hidden = false;
  $('role').textContent = role === 'admin' ? 'Signed in: admin' : 'Signed in: read-only (no actions)';
}

// The address's path segments, decoded; null when one holds a malformed escape (`%E0%A4%A`),
// which names no page (decodeURIComponent would throw and leave the previous page on screen).
function decodeSegments(path) {
  try {
    return path.split('/').filter(Boolean).map(decodeURIComponent);
  } catch (e) {
    if (e instanceof URIError) return null;
    throw e;
  }
}

function notFoundView(address) {
  render(h('h1', {}, 'Page not found'),
    h('p', {}, `There is no page at ${address}: part of the address is not validly encoded.`),
    h('p', {}, h('a', { href: '#/instances' }, 'Go to the instances')));
}

async function route() {
  if (!role) return;
  const [path, query = ''] = location.hash.replace(/^#/, '').split('?');
  const params = new URLSearchParams(query);
  const parts = decodeSegments(path);
  const section = parts ? parts[0] || 'instances' : path.split('/').filter(Boolean)[0];
  for (const a of document.querySelectorAll('nav a')) {
    if (a.dataset.section === section) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  setStatus('Loading…');
  const view = $('view');
  view.setAttribute('aria-busy', 'true');
  try {
    if (!parts) notFoundView(location.hash);
    else if (section === 'events' && parts[1]) await eventView(parts[1]);
    else if (section === 'events') await eventsView(params);
    else if (section === 'dead-letters' && parts[1]) await deadLetterView(parts[1]);
    else if (section === 'dead-letters') await deadLettersView(params);
    else if (section === 'instances' && parts[1] === 'new') await instanceEditView(null);
    else if (section === 'instances' && parts[2] === 'edit') await instanceEditView(parts[1]);
    else if (section === 'instances' && parts[2] === 'health') await healthView(parts[1]);
    else await instancesView();
    document.title = `${document.querySelector('#view h1')?.textContent || 'Console'} — ecwid-events`;
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    if (e.status !== 401) render(h('h1', {}, 'Could not load this page'), answer('The server refused', false, [e.message], e.body));
  }
  // Which address the view now shows: lets a person's assistive tools (aria-busy) and the
  // browser test tell a finished page from the one before it.
  view.removeAttribute('aria-busy');
  view.dataset.shown = location.hash;
  setStatus('');
}

async function start() {
  $('sign-in-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $('token').value.trim());
    try {
      await learnRole();
      await route();
      $('main').focus();
    } catch (err) {
      if (err instanceof ApiError && err.status !== 401) showSignIn(err.message);
    }
  });
  $('sign-out').addEventListener('click', () => signOut('Signed out.'));
  window.addEventListener('hashchange', () => route().then(() => $('main').focus()));
  if (sessionStorage.getItem(TOKEN_KEY)) {
    try { await learnRole(); await route(); } catch (err) { if (err instanceof ApiError && err.status !== 401) showSignIn(err.message); }
  } else showSignIn('');
}

start();
