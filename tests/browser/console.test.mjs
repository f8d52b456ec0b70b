// Drives the real console in Debian's headless Chromium against a running pipeline.
// Started by tests/tests/console.rs, which sets up the services and checks what they saw.
// Env: ADMIN_URL (http://127.0.0.1:port), ADMIN_TOKEN, READ_TOKEN, OBJECT_ID (an event to find),
// DEAD_INSTANCE (the instance whose callback answers 410), SCREENSHOTS (dir, optional),
// CHROMIUM (default /usr/bin/chromium). Exits 0 when every step passed, 1 otherwise.

import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const ADMIN_URL = env('ADMIN_URL');
const ADMIN_TOKEN = env('ADMIN_TOKEN');
const READ_TOKEN = env('READ_TOKEN');
const OBJECT_ID = env('OBJECT_ID');
const DEAD_INSTANCE = env('DEAD_INSTANCE');
const SHOTS = process.env.SCREENSHOTS;
const TIMEOUT = 15_000;

const step = (name) => console.log(`step: ${name}`);

async function api(method, path, token) {
  const res = await fetch(ADMIN_URL + path, { method, headers: { Authorization: `Bearer ${token}` } });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

async function shot(page, name) {
  // Every screen shot is also checked for a value that leaked as text.
  const text = await page.evaluate(() => {
    const body = document.body.cloneNode(true);
    for (const raw of body.querySelectorAll('pre, details, dialog')) raw.remove(); // JSON as JSON
    // Text node by text node: concatenated, "false" + "Name" would hide the word.
    const walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT);
    const parts = [];
    while (walker.nextNode()) parts.push(walker.currentNode.data);
    return parts.join('\n');
  });
  const junk = text.match(/\b(false|true|undefined|null|NaN)\b|\[object Object\]/);
  assert.equal(junk, null, `${name} shows "${junk && junk[0]}"`);
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

async function confirm(page, label) {
  const dialog = page.locator('dialog#confirm');
  await dialog.waitFor({ state: 'visible' });
  await dialog.getByRole('button', { name: label }).click();
}

// Waits until the view shows the page of the current address (not the one before it).
async function shown(page) {
  await page.waitForFunction(() => {
    const view = document.getElementById('view');
    return !view.hasAttribute('aria-busy') && view.dataset.shown === location.hash;
  });
}

async function signIn(page, token) {
  await page.goto(`${ADMIN_URL}/ui/`);
  await page.getByLabel('Token').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
}

const profile = mkdtempSync(join(tmpdir(), 'console-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1280, height: 860 },
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
context.setDefaultTimeout(TIMEOUT);
let failed = false;
try {
  const page = context.pages()[0] || await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' && !/status of (401|403|404|422|504)/.test(m.text())) problems.push(`console: ${m.text()}`); });
  // Nothing outside the admin listener is ever fetched.
  page.on('request', (r) => { if (!r.url().startsWith(ADMIN_URL)) problems.push(`request elsewhere: ${r.url()}`); });

  step('a wrong token is refused and says so');
  await signIn(page, 'this-is-not-the-token');
  await page.getByText('The token was refused').waitFor();
  assert.equal(await page.locator('nav#nav').isVisible(), false);
  await shot(page, 'console-sign-in');

  step('the admin token signs in and lists the instances');
  await signIn(page, ADMIN_TOKEN);
  await page.getByText('Signed in: admin').waitFor();
  await page.getByRole('heading', { name: 'Instances' }).waitFor();
  await shown(page);
  await page.getByRole('cell', { name: /store 7001/ }).waitFor();
  assert.equal(await page.evaluate(() => document.cookie), '', 'no cookie');
  assert.ok(!page.url().includes(ADMIN_TOKEN), 'the token is not in the URL');
  await shot(page, 'console-instances');

  step('the token is kept for the tab: a reload stays signed in');
  await page.reload();
  await page.getByText('Signed in: admin').waitFor();

  step('send a test event and read the answer');
  // The real call: the deliverer makes one attempt to the instance's receiver and answers it.
  const testCalls = [];
  page.on('request', (r) => {
    if (r.method() === 'POST' && /\/instances\/[^/]+\/test$/.test(new URL(r.url()).pathname)) {
      testCalls.push(r.headers().authorization);
    }
  });
  const row7001 = page.getByRole('row', { name: /store 7001/ });
  await row7001.getByRole('button', { name: 'Send test event' }).click();
  await confirm(page, 'Send test event');
  await page.getByTestId('result').getByText(/Delivered: the callback answered 200 in \d+ ms\./).waitFor({ timeout: 60000 });
  assert.deepEqual(testCalls, [`Bearer ${ADMIN_TOKEN}`]);
  // Cancelling a confirmation does nothing.
  await row7001.getByRole('button', { name: 'Send test event' }).click();
  await confirm(page, 'Cancel');
  assert.equal(testCalls.length, 1);

  step('pause and resume an instance, and read its health');
  const INSTANCE_7001 = (await api('GET', '/instances', ADMIN_TOKEN)).body.instances
    .find((i) => i.configuration['ecwid.store.id'] === '7001').id;
  await row7001.getByRole('button', { name: 'Pause…' }).click();
  await confirm(page, 'Pause');
  await page.getByTestId('result').getByText(/Paused: instance .* is paused since/).waitFor();
  assert.equal((await api('GET', `/instances/${encodeURIComponent(INSTANCE_7001)}/health`, ADMIN_TOKEN)).body.state, 'paused');
  await page.getByRole('link', { name: /Back to instances/ }).click();
  await page.getByRole('row', { name: /store 7001/ }).getByText('paused', { exact: true }).waitFor();
  await page.getByRole('row', { name: /store 7001/ }).getByRole('link', { name: 'Health' }).click();
  await page.getByRole('heading', { name: /Health of "store 7001"/ }).waitFor();
  await shot(page, 'console-health');
  await page.getByRole('button', { name: 'Resume…' }).click();
  await confirm(page, 'Resume');
  await page.getByTestId('result').getByText(/Resumed: instance .* is active since/).waitFor();
  assert.equal((await api('GET', `/instances/${encodeURIComponent(INSTANCE_7001)}/health`, ADMIN_TOKEN)).body.state, 'active');
  await page.getByRole('link', { name: 'Instances' }).first().click();
  await page.getByRole('heading', { name: 'Instances' }).waitFor();
  await shown(page);

  step('edit an instance: secrets stay masked and are kept');
  await row7001.getByRole('link', { name: 'Edit' }).click();
  await page.getByRole('heading', { name: /Edit instance/ }).waitFor();
  assert.equal(await page.getByLabel('Order key (secret)').inputValue(), '********');
  await page.getByLabel('Name').fill('store 7001 (renamed)');
  await page.getByRole('button', { name: 'Save…' }).click();
  await confirm(page, 'Save');
  await page.getByText(/Saved instance/).waitFor();

  step('create an instance with the form');
  await page.getByRole('link', { name: 'Instances' }).first().click();
  await page.getByRole('link', { name: 'New instance' }).click();
  await page.getByRole('heading', { name: 'New instance' }).waitFor();
  await page.getByLabel('Name', { exact: true }).fill('store 7003');
  await page.getByLabel('Store id').fill('7003');
  await page.getByLabel('Callback URL').fill(env('CALLBACK_URL'));
  await page.getByLabel('Signature key (secret)').fill('a-signature-key');
  await page.getByRole('button', { name: 'Create…' }).click();
  await confirm(page, 'Create');
  await page.getByText(/Created instance/).waitFor();
  // A refusal reads as the API's message: a store id that is not digits.
  await page.getByLabel('Store id').fill('not-a-store');
  await page.getByRole('button', { name: 'Create…' }).click();
  await confirm(page, 'Create');
  await page.getByTestId('result').getByText(/422 invalid_field: configuration\.ecwid\.store\.id/).waitFor();

  step('replay a window of an instance');
  await page.getByRole('link', { name: 'Instances' }).first().click();
  await page.getByRole('row', { name: /store 7001/ }).getByRole('button', { name: 'Replay window…' }).click();
  await page.getByRole('heading', { name: /Replay a window/ }).waitFor();
  await page.locator('form.edit').getByRole('button', { name: 'Replay window…' }).click();
  await confirm(page, 'Replay');
  await page.getByTestId('result').getByText('3 event(s) sent again.').waitFor();

  step('events received in the last hour, by instance and time');
  const live = await api('GET', '/instances?storeId=7001', ADMIN_TOKEN);
  await page.getByRole('link', { name: 'Events' }).first().click();
  await page.getByRole('heading', { name: 'Events' }).waitFor();
  await shown(page);
  await page.getByLabel('Instance id').fill(live.body.instances[0].id);
  const hourAgo = new Date(Date.now() - 3600e3);
  const p2 = (n) => String(n).padStart(2, '0');
  await page.getByLabel('Received from').fill(`${hourAgo.getFullYear()}-${p2(hourAgo.getMonth() + 1)}-${p2(hourAgo.getDate())}T${p2(hourAgo.getHours())}:${p2(hourAgo.getMinutes())}`);
  await page.getByRole('button', { name: 'Search' }).click();
  await page.waitForURL(/since=/);
  await shown(page);
  assert.equal(await page.locator('tbody tr').count(), 3);

  step('find the event by objectId');
  await page.getByRole('link', { name: 'Events' }).first().click();
  await page.getByRole('heading', { name: 'Events' }).waitFor();
  await shown(page);
  await page.getByRole('link', { name: 'Events' }).first().click();
  await page.getByRole('heading', { name: 'Events' }).waitFor();
  await shown(page);
  await page.getByLabel('Object id').fill(OBJECT_ID);
  await page.getByRole('button', { name: 'Search' }).click();
  await page.waitForURL(/objectId=/);
  await shown(page);
  const eventRows = page.locator('tbody tr');
  await eventRows.first().waitFor();
  assert.equal(await eventRows.count(), 1, 'one event has this objectId');
  await shot(page, 'console-events');

  step('open the event: attempts and the envelope as delivered');
  await eventRows.first().getByRole('link').click();
  await page.getByRole('heading', { name: `Event orders ${OBJECT_ID}` }).waitFor();
  const id = decodeURIComponent(page.url().split('#/events/')[1]);
  const before = await api('GET', `/events/${encodeURIComponent(id)}`, ADMIN_TOKEN);
  await page.getByRole('heading', { name: `Attempts (${before.body.attempts.length})` }).waitFor();
  const envelope = await page.getByLabel('Envelope JSON').textContent();
  assert.deepEqual(JSON.parse(envelope), before.body.envelope);
  await shot(page, 'console-event');

  step('redeliver it and see the server answer');
  await page.getByRole('button', { name: 'Redeliver…' }).click();
  await confirm(page, 'Redeliver');
  await page.getByTestId('result').getByText(/Redelivery queued; the event is now (pending|retrying|delivered)/).waitFor();
  await page.getByTestId('result').getByRole('button', { name: 'Refresh' }).click();
  const after = await api('GET', `/events/${encodeURIComponent(id)}`, ADMIN_TOKEN);
  await page.getByRole('heading', { name: `Attempts (${after.body.attempts.length})` }).waitFor();
  console.log(`redelivered: ${id}`);

  step('the attempts timeline of the real record');
  // Delivered first, then sent again by the window replay and the redelivery: every attempt is
  // on the record, each answered 200 by the receiver.
  await page.goto(`${ADMIN_URL}/ui/#/events/${encodeURIComponent(id)}`);
  await shown(page);
  const record = await api('GET', `/events/${encodeURIComponent(id)}`, ADMIN_TOKEN);
  const n = record.body.attempts.length;
  assert.ok(n >= 2, `the record has its attempts: ${n}`);
  await page.getByRole('heading', { name: `Attempts (${n})` }).waitFor();
  const steps = page.getByRole('list', { name: 'Attempts, oldest first' }).getByRole('listitem');
  assert.equal(await steps.count(), n);
  assert.match(await steps.nth(0).innerText(), /#1 \S+ — 200 in \d+ ms/);
  await shot(page, 'console-event-attempts');

  step('an address with a malformed escape shows "not found", not the page before it');
  // Changed in place (a hashchange, as a pasted or edited address is): decoding it threw once,
  // and the event's page stayed on screen under the new address.
  await page.evaluate(() => { location.hash = '#/events/%E0%A4%A'; });
  await shown(page);
  await page.getByRole('heading', { name: 'Page not found' }).waitFor();
  assert.equal(await page.getByRole('heading', { name: /^Attempts/ }).count(), 0);
  await page.getByRole('link', { name: 'Go to the instances' }).click();
  await page.getByRole('heading', { name: 'Instances' }).waitFor();
  await shown(page);

  step('dead letters: list, open, replay');
  await page.getByRole('link', { name: 'Dead letters' }).first().click();
  await page.getByRole('heading', { name: 'Dead letters' }).waitFor();
  await shown(page);
  await page.getByLabel('Instance id').fill(DEAD_INSTANCE);
  await page.getByRole('button', { name: 'Search' }).click();
  await page.waitForURL(/instance=/);
  await shown(page);
  const deadRow = page.locator('tbody tr').first();
  await deadRow.waitFor();
  await shot(page, 'console-dead-letters');
  await deadRow.getByRole('link').click();
  await page.getByRole('heading', { name: /Dead letter #\d+/ }).waitFor();
  await page.getByRole('heading', { name: 'Payload' }).waitFor();
  const seq = (await page.getByRole('heading', { level: 1 }).textContent()).match(/#(\d+)/)[1];
  await page.getByRole('button', { name: 'Replay…' }).click();
  await confirm(page, 'Replay');
  await page.getByTestId('result').getByText(`Replayed: #${seq}.`).waitFor();
  console.log(`replayed: ${seq}`);
  // A second replay of the same letter is refused, and the refusal is shown as text.
  await page.getByRole('button', { name: 'Replay…' }).click();
  await confirm(page, 'Replay');
  await page.getByTestId('result').getByText(`#${seq} failed: not_found`).waitFor();

  step('keyboard: the skip link comes first and the sections are links');
  await page.goto(`${ADMIN_URL}/ui/#/instances`);
  await page.reload();
  await page.getByRole('heading', { name: 'Instances' }).waitFor();
  await shown(page);
  const focused = () => page.evaluate(() => document.activeElement.textContent.trim() || document.activeElement.id);
  await page.keyboard.press('Tab');
  assert.equal(await focused(), 'Skip to content');
  await page.keyboard.press('Tab');
  await page.keyboard.press('Tab');
  assert.equal(await focused(), 'Events');
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Events' }).waitFor();
  await shown(page);
  // After a section opens, focus is on the content, so the next Tab is in the new page.
  await page.waitForFunction(() => document.activeElement.id === 'main');
  await page.goto(`${ADMIN_URL}/ui/#/instances`);
  await page.getByRole('heading', { name: 'Instances' }).waitFor();
  await shown(page);

  step('a narrow window: nothing wider than the screen but the tables, which scroll');
  await page.setViewportSize({ width: 390, height: 800 });
  await page.getByRole('heading', { name: 'Instances' }).waitFor();
  await shown(page);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `the page is ${overflow}px wider than the window`);
  await shot(page, 'console-narrow');
  await page.setViewportSize({ width: 1280, height: 860 });

  step('the read-only token: no actions, and the API says 403');
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByLabel('Token').waitFor();
  await signIn(page, READ_TOKEN);
  await page.getByText('Signed in: read-only').waitFor();
  await page.getByRole('cell', { name: /store 7001/ }).waitFor();
  for (const name of ['Send test event', 'Replay window…', 'Pause…', 'Resume…']) {
    assert.equal(await page.getByRole('button', { name }).count(), 0, `${name} is hidden`);
  }
  assert.equal(await page.getByRole('link', { name: 'Edit' }).count(), 0);
  assert.equal(await page.getByRole('link', { name: 'New instance' }).count(), 0);
  await shot(page, 'console-read-only');
  await page.goto(`${ADMIN_URL}/ui/#/events/${encodeURIComponent(id)}`);
  await page.getByRole('heading', { name: `Event orders ${OBJECT_ID}` }).waitFor();
  assert.equal(await page.getByRole('button', { name: 'Redeliver…' }).count(), 0);
  await page.goto(`${ADMIN_URL}/ui/#/dead-letters`);
  await page.getByRole('heading', { name: 'Dead letters' }).waitFor();
  await shown(page);
  assert.equal(await page.getByRole('button', { name: /Replay|Delete/ }).count(), 0);
  const tried = await page.evaluate(async ([path, token]) => {
    const r = await fetch(path, { method: 'POST', headers: { Authorization: `Bearer ${token}` } });
    return { status: r.status, body: await r.json() };
  }, [`/events/${encodeURIComponent(id)}/redeliver`, READ_TOKEN]);
  assert.equal(tried.status, 403);
  assert.equal(tried.body.error, 'forbidden');

  assert.deepEqual(problems, []);
  console.log('console browser test: all steps passed');
} catch (e) {
  failed = true;
  console.error(e);
  try {
    const page = context.pages()[0];
    if (page && SHOTS) await page.screenshot({ path: join(tmpdir(), 'console-failure.png'), fullPage: true });
    console.error(`failure screenshot: ${join(tmpdir(), 'console-failure.png')}`);
  } catch { /* the browser is gone */ }
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
