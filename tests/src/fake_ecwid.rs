//! A fake Ecwid REST API v3 on `127.0.0.1:0`, from the documented shapes: per store a token,
//! entities by type (`orders`, `carts`, `products`, `customers`, `discount_coupons`, `reviews`)
//! searched by `updatedFrom`/`updatedTo` and paged by `offset`/`limit`, deletions under
//! `/{type}/deleted?from_date=&to_date=`, and `latest-stats`. A wrong token is 403; scripted
//! answers (429 with `Retry-After`, 5xx) come first when queued. Every request is recorded.
//!
//! Ecwid's OAuth too, as documented for apps: `GET /api/oauth/authorize?client_id=&redirect_uri=
//! &response_type=code&scope=&state=` (the merchant approves at once, for the store the test
//! chose, and is sent back to `redirect_uri?code=&state=`) and `POST /api/oauth/token` (form:
//! `client_id`, `client_secret`, `code`, `redirect_uri`, `grant_type=authorization_code`), which
//! answers `{"access_token","token_type":"bearer","scope","store_id",…}` once per code.
//!
//! For the hostile-API tests a store can misbehave on purpose ([`Misbehavior`]): bodies that
//! never end, pages whose `total` keeps growing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// One request the fake got.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub at: Instant,
    pub at_ms: i64,
    pub store: String,
    /// `orders`, `orders/deleted`, `latest-stats` …
    pub path: String,
    pub query: HashMap<String, String>,
    pub token: String,
    pub user_agent: String,
    pub status: u16,
}

#[derive(Debug, Default)]
struct StoreData {
    token: String,
    /// type → id → item
    items: HashMap<String, BTreeMap<String, Value>>,
    /// type → deleted `{"id","date"}`
    deleted: HashMap<String, Vec<Value>>,
    /// Report every type as changed now in latest-stats (so every cycle reads every list).
    always_changed: bool,
    misbehavior: Option<Misbehavior>,
}

/// How a store's answers misbehave on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehavior {
    /// Every request of the store (latest-stats too) answers `status` with a body that starts
    /// like JSON and never ends.
    EndlessBody { status: u16 },
    /// Every list answers a full page of new entities (changed at the window's start) and a
    /// `total` always two pages beyond it, however far the client reads.
    GrowingTotal,
}

#[derive(Debug, Default)]
struct FakeState {
    stores: HashMap<String, StoreData>,
    requests: Vec<ApiRequest>,
    /// Answers to give before the real ones: (status, raw Retry-After).
    scripted: VecDeque<(u16, Option<String>)>,
    /// Endless bodies still being sent (the client has not hung up).
    open_bodies: Arc<AtomicUsize>,
    oauth: OAuthState,
}

/// The fake's OAuth side.
#[derive(Debug, Default)]
struct OAuthState {
    /// The registered app: client id and secret.
    app: Option<(String, String)>,
    /// Who approves the next authorization: a store id and the token it gets.
    approving: Option<(String, String)>,
    /// Codes handed out and not yet exchanged: code → (store, token, redirect_uri, scope).
    codes: HashMap<String, (String, String, String, String)>,
    /// Token requests answered, by status.
    token_requests: Vec<u16>,
}

#[derive(Debug)]
pub struct FakeEcwid {
    pub addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    open_bodies: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

pub fn now_secs() -> i64 {
    model::time_fmt::now_unix_ms() / 1000
}

impl FakeEcwid {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Ecwid");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(FakeState::default()));
        let open_bodies = Arc::clone(&state.lock().expect("lock").open_bodies);
        let app = Router::new()
            .route("/api/v3/{store}/latest-stats", get(stats))
            .route("/api/v3/{store}/{entity}", get(list))
            .route("/api/v3/{store}/{entity}/deleted", get(deleted))
            .route("/api/oauth/authorize", get(authorize))
            .route("/api/oauth/token", axum::routing::post(token))
            .with_state(Arc::clone(&state));
        let cancel = CancellationToken::new();
        crate::serve_until(listener, app, &cancel);
        Self {
            addr,
            state,
            open_bodies,
            cancel,
        }
    }

    /// `ECWID_API_URL` for the poller.
    pub fn url(&self) -> String {
        format!("http://{}/api/v3", self.addr)
    }

    /// `ECWID_OAUTH_URL` for app mode.
    pub fn oauth_url(&self) -> String {
        format!("http://{}/api/oauth", self.addr)
    }

    /// Registers the app whose installs the fake authorizes.
    pub fn register_app(&self, client_id: &str, client_secret: &str) {
        self.state.lock().expect("lock").oauth.app =
            Some((client_id.to_owned(), client_secret.to_owned()));
    }

    /// The next authorization is approved by store `store`, whose REST API then takes `token`
    /// (the store is added, or its token replaced).
    pub fn approve_next_install(&self, store: &str, token: &str) {
        self.add_store(store, token);
        self.state.lock().expect("lock").oauth.approving =
            Some((store.to_owned(), token.to_owned()));
    }

    /// The statuses the token endpoint answered, in order.
    pub fn token_requests(&self) -> Vec<u16> {
        self.state
            .lock()
            .expect("lock")
            .oauth
            .token_requests
            .clone()
    }

    pub fn add_store(&self, store: &str, token: &str) {
        let mut s = self.state.lock().expect("lock");
        let data = s.stores.entry(store.to_owned()).or_default();
        data.token = token.to_owned();
    }

    pub fn set_always_changed(&self, store: &str) {
        let mut s = self.state.lock().expect("lock");
        s.stores.entry(store.to_owned()).or_default().always_changed = true;
    }

    pub fn misbehave(&self, store: &str, how: Misbehavior) {
        let mut s = self.state.lock().expect("lock");
        s.stores.entry(store.to_owned()).or_default().misbehavior = Some(how);
    }

    /// Endless bodies the fake is still sending: 0 once every client reading one hung up.
    pub fn open_bodies(&self) -> usize {
        self.open_bodies.load(Ordering::SeqCst)
    }

    /// Creates or replaces an item of `entity` (its `id`, or `cartId` for carts, must be set);
    /// `createTimestamp`/`updateTimestamp` are the caller's.
    pub fn upsert(&self, store: &str, entity: &str, item: Value) {
        let id = item
            .get("cartId")
            .or_else(|| item.get("id"))
            .map(|v| v.to_string().trim_matches('"').to_owned())
            .expect("an id");
        let mut s = self.state.lock().expect("lock");
        let data = s.stores.entry(store.to_owned()).or_default();
        data.items
            .entry(entity.to_owned())
            .or_default()
            .insert(id, item);
    }

    pub fn delete(&self, store: &str, entity: &str, id: &str, date: i64) {
        let mut s = self.state.lock().expect("lock");
        let data = s.stores.entry(store.to_owned()).or_default();
        if let Some(items) = data.items.get_mut(entity) {
            items.remove(id);
        }
        data.deleted
            .entry(entity.to_owned())
            .or_default()
            .push(json!({"id": id, "date": date}));
    }

    /// The next request (whatever it is) answers `status`, with `Retry-After` when given.
    pub fn script(&self, status: u16, retry_after: Option<u64>) {
        self.script_raw(status, retry_after.map(|s| s.to_string()).as_deref());
    }

    /// The next request answers `status` with this `Retry-After` exactly as written (`1e20`,
    /// `-5`, a date …).
    pub fn script_raw(&self, status: u16, retry_after: Option<&str>) {
        self.state
            .lock()
            .expect("lock")
            .scripted
            .push_back((status, retry_after.map(str::to_owned)));
    }

    pub fn requests(&self) -> Vec<ApiRequest> {
        self.state.lock().expect("lock").requests.clone()
    }

    pub fn requests_for(&self, store: &str) -> Vec<ApiRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.store == store)
            .collect()
    }
}

impl Drop for FakeEcwid {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

type Shared = Arc<Mutex<FakeState>>;

fn iso(t: i64) -> String {
    let s = model::time_fmt::unix_secs_to_rfc3339(t).unwrap_or_default();
    // latest-stats writes +0000, not Z.
    s.trim_end_matches('Z').to_owned() + "+0000"
}

fn num(q: &HashMap<String, String>, name: &str) -> Option<i64> {
    q.get(name).and_then(|v| v.parse().ok())
}

fn updated(item: &Value) -> i64 {
    item["updateTimestamp"]
        .as_i64()
        .or_else(|| item["createTimestamp"].as_i64())
        .unwrap_or(0)
}

/// Records the request and decides whether it gets a scripted or refused answer.
fn admit(
    state: &Shared,
    store: &str,
    path: &str,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<(), Box<Response>> {
    let mut s = state.lock().expect("lock");
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let user_agent = headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let endless = match s.stores.get(store).and_then(|d| d.misbehavior) {
        Some(Misbehavior::EndlessBody { status }) => Some(status),
        _ => None,
    };
    let (status, retry_after) = match s.scripted.pop_front() {
        Some(x) => x,
        None => match (s.stores.get(store), endless) {
            (_, Some(status)) => (status, None),
            (None, _) => (404, None),
            (Some(d), _) if d.token != token => (403, None),
            (Some(_), _) => (200, None),
        },
    };
    s.requests.push(ApiRequest {
        at: Instant::now(),
        at_ms: model::time_fmt::now_unix_ms(),
        store: store.to_owned(),
        path: path.to_owned(),
        query: query.clone(),
        token,
        user_agent,
        status,
    });
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if endless.is_some() {
        return Err(Box::new(endless_body(code, Arc::clone(&s.open_bodies))));
    }
    if status == 200 {
        return Ok(());
    }
    let body = Json(
        json!({"errorMessage": format!("fake Ecwid answers {status}"), "errorCode": status.to_string()}),
    );
    Err(Box::new(match retry_after {
        Some(value) => (code, [("retry-after", value)], body).into_response(),
        None => (code, body).into_response(),
    }))
}

/// Counts itself in `open` while the body it belongs to is being sent.
struct OpenBody(Arc<AtomicUsize>);

impl Drop for OpenBody {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `status` with a body that starts like Ecwid's JSON and never ends (no `Content-Length`).
fn endless_body(status: StatusCode, open: Arc<AtomicUsize>) -> Response {
    open.fetch_add(1, Ordering::SeqCst);
    let guard = OpenBody(open);
    let head = futures::stream::once(async {
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(b"{\"errorMessage\":\"a"))
    });
    let filler = bytes::Bytes::from(vec![b'a'; 64 * 1024]);
    let tail = futures::stream::repeat_with(move || {
        // Lives as long as the stream: dropped when the client hangs up.
        let _alive = &guard;
        Ok(filler.clone())
    });
    (status, axum::body::Body::from_stream(head.chain(tail))).into_response()
}

async fn stats(
    State(state): State<Shared>,
    Path(store): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = admit(&state, &store, "latest-stats", &headers, &q) {
        return *r;
    }
    let s = state.lock().expect("lock");
    let Some(data) = s.stores.get(&store) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let field = |entity: &str| match entity {
        "orders" => "ordersUpdated",
        "carts" => "abandonedSalesUpdated",
        "products" => "productsUpdated",
        "customers" => "customersUpdated",
        "discount_coupons" => "discountCouponsUpdated",
        _ => "reviewsUpdated",
    };
    let mut out = serde_json::Map::new();
    for entity in [
        "orders",
        "carts",
        "products",
        "customers",
        "discount_coupons",
        "reviews",
    ] {
        let newest = data
            .items
            .get(entity)
            .into_iter()
            .flat_map(|m| m.values().map(updated))
            .chain(
                data.deleted
                    .get(entity)
                    .into_iter()
                    .flat_map(|d| d.iter().filter_map(|x| x["date"].as_i64())),
            )
            .max()
            .unwrap_or(0);
        let newest = if data.always_changed {
            now_secs()
        } else {
            newest
        };
        out.insert(field(entity).to_owned(), json!(iso(newest)));
    }
    Json(Value::Object(out)).into_response()
}

fn page(items: Vec<Value>, q: &HashMap<String, String>) -> Value {
    let offset = num(q, "offset").unwrap_or(0).max(0) as usize;
    let limit = num(q, "limit").unwrap_or(100).clamp(1, 100) as usize;
    let total = items.len();
    let slice: Vec<Value> = items.into_iter().skip(offset).take(limit).collect();
    json!({"total": total, "count": slice.len(), "offset": offset, "limit": limit, "items": slice})
}

/// A full page of entities that were not there a moment ago, and a `total` two pages further.
fn growing_page(from: i64, q: &HashMap<String, String>) -> Value {
    let offset = num(q, "offset").unwrap_or(0).max(0);
    let limit = num(q, "limit").unwrap_or(100).clamp(1, 100);
    let items: Vec<Value> = (offset..offset + limit)
        .map(|n| json!({"id": n, "cartId": format!("c{n}"), "createTimestamp": from, "updateTimestamp": from}))
        .collect();
    json!({"total": offset + 3 * limit, "count": limit, "offset": offset, "limit": limit, "items": items})
}

async fn list(
    State(state): State<Shared>,
    Path((store, entity)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = admit(&state, &store, &entity, &headers, &q) {
        return *r;
    }
    let from = num(&q, "updatedFrom").unwrap_or(i64::MIN);
    let to = num(&q, "updatedTo").unwrap_or(i64::MAX);
    let s = state.lock().expect("lock");
    if s.stores.get(&store).and_then(|d| d.misbehavior) == Some(Misbehavior::GrowingTotal) {
        return Json(growing_page(from, &q)).into_response();
    }
    let items: Vec<Value> = s
        .stores
        .get(&store)
        .and_then(|d| d.items.get(&entity))
        .map(|m| {
            m.values()
                .filter(|i| (from..=to).contains(&updated(i)))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Json(page(items, &q)).into_response()
}

async fn deleted(
    State(state): State<Shared>,
    Path((store, entity)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = admit(&state, &store, &format!("{entity}/deleted"), &headers, &q) {
        return *r;
    }
    let from = num(&q, "from_date").unwrap_or(i64::MIN);
    let to = num(&q, "to_date").unwrap_or(i64::MAX);
    let s = state.lock().expect("lock");
    let items: Vec<Value> = s
        .stores
        .get(&store)
        .and_then(|d| d.deleted.get(&entity))
        .map(|d| {
            d.iter()
                .filter(|x| x["date"].as_i64().is_some_and(|t| (from..=to).contains(&t)))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Json(page(items, &q)).into_response()
}

/// `GET /api/oauth/authorize`: checks the request as Ecwid does, then sends the merchant back
/// with a code (or `error=access_denied` when no store approves).
async fn authorize(
    State(state): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut s = state.lock().expect("lock");
    let client_ok = s
        .oauth
        .app
        .as_ref()
        .is_some_and(|(id, _)| q.get("client_id") == Some(id));
    let (Some(redirect), Some(oauth_state)) = (q.get("redirect_uri"), q.get("state")) else {
        return (
            StatusCode::BAD_REQUEST,
            "redirect_uri and state are required",
        )
            .into_response();
    };
    if !client_ok || q.get("response_type").map(String::as_str) != Some("code") {
        return (
            StatusCode::BAD_REQUEST,
            "unknown client_id or response_type",
        )
            .into_response();
    }
    let mut back = url::Url::parse(redirect).expect("redirect_uri is a URL");
    match s.oauth.approving.take() {
        Some((store, token)) => {
            let code = uuid::Uuid::new_v4().simple().to_string();
            let scope = q.get("scope").cloned().unwrap_or_default();
            s.oauth
                .codes
                .insert(code.clone(), (store, token, redirect.clone(), scope));
            back.query_pairs_mut()
                .append_pair("code", &code)
                .append_pair("state", oauth_state);
        }
        None => {
            back.query_pairs_mut()
                .append_pair("error", "access_denied")
                .append_pair("state", oauth_state);
        }
    }
    (
        StatusCode::FOUND,
        [(axum::http::header::LOCATION, back.to_string())],
    )
        .into_response()
}

/// `POST /api/oauth/token`: the code exchange, good once per code.
async fn token(State(state): State<Shared>, body: axum::body::Bytes) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let mut s = state.lock().expect("lock");
    let app_ok = s.oauth.app.as_ref().is_some_and(|(id, secret)| {
        form.get("client_id") == Some(id) && form.get("client_secret") == Some(secret)
    });
    let grant_ok = form.get("grant_type").map(String::as_str) == Some("authorization_code");
    let code = form.get("code").and_then(|c| s.oauth.codes.remove(c));
    let answer = match code {
        Some((store, token, redirect, scope))
            if app_ok && grant_ok && form.get("redirect_uri") == Some(&redirect) =>
        {
            let store_id: u64 = store.parse().expect("numeric store id");
            (
                StatusCode::OK,
                Json(
                    json!({"access_token": token, "token_type": "bearer", "scope": scope,
                            "store_id": store_id, "public_token": format!("public_{store}")}),
                ),
            )
        }
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": "the code is not valid"})),
        ),
    };
    s.oauth.token_requests.push(answer.0.as_u16());
    answer.into_response()
}
