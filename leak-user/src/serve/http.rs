//! `/metrics`, `/kills` and `/healthz`, served concurrently with graceful shutdown.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Path, RawQuery, State},
    http::{header, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::get,
    Json, Router,
};
use tokio::{net::TcpListener, sync::RwLock};

use super::{
    html::{self, LiveSeries},
    metrics::Metrics,
};
use crate::{
    model::kill::Kill,
    store::{disk::SharedStore, filter::KillFilter, RecentKills},
    sys,
};

/// What the handlers read.
pub struct Shared {
    pub metrics: Metrics,
    pub kills: RwLock<RecentKills>,
    pub attach_mode: String,
    /// The watched cgroups' recent points, refreshed by the agent every second.
    pub live: RwLock<Vec<LiveSeries>>,
    /// The kills on disk, when there is a store: `/kills` is served from it.
    pub store: Option<SharedStore>,
    /// How many kills `/kills` returns without `?limit`.
    pub default_limit: usize,
}

impl Shared {
    /// Counts the kill and keeps it for `/kills`.
    pub async fn publish_kill(&self, kill: Kill) {
        self.metrics.record_kill(&kill);
        self.kills.write().await.push(kill);
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/kills", get(kills))
        .route("/kills/{seq}", get(kill_json))
        .route("/healthz", get(healthz))
        .route("/", get(index_page))
        .route("/kill/{seq}", get(kill_page))
        .route("/live", get(live_page))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    exposition(shared.metrics.render())
}

/// A Prometheus text exposition as an HTTP response (or the reason it could not be encoded).
pub fn exposition<E: std::fmt::Display>(body: Result<String, E>) -> Response {
    match body {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

/// Encodes every metric of `registry` in the text format.
pub fn encode(registry: &prometheus::Registry) -> Result<String, prometheus::Error> {
    use prometheus::Encoder as _;
    let mut buffer = Vec::new();
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut buffer)?;
    Ok(String::from_utf8_lossy(&buffer).into_owned())
}

/// Serves `registry` on `/metrics` alone, until the process ends (`leak workload`).
pub fn serve_registry(listener: TcpListener, registry: prometheus::Registry) {
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move { exposition(encode(&registry)) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
}

/// The most recent kills, newest first, from the store when there is one: `?limit=N` caps
/// the count; `namespace`, `pod`, `container`, `cgroup`, `since` and `until` select.
async fn kills(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    let pairs: Vec<(String, String)> =
        match serde_urlencoded::from_str(query.as_deref().unwrap_or_default()) {
            Ok(pairs) => pairs,
            Err(err) => {
                return (StatusCode::BAD_REQUEST, format!("malformed query: {err}\n"))
                    .into_response()
            }
        };
    let filter = match KillFilter::from_query(
        pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        shared.default_limit,
    ) {
        Ok(filter) => filter,
        Err(err) => return (StatusCode::BAD_REQUEST, format!("{err}\n")).into_response(),
    };
    let mut selected: Vec<Kill> = {
        let kills = shared.kills.read().await;
        let found = kills
            .newest_first()
            .filter(|kill| filter.matches(kill))
            .take(filter.limit)
            .cloned()
            .collect();
        found
    };
    // The store holds what memory no longer does; memory holds what the store could not take
    // (a full or failing disk). Both, once each, newest first.
    if let Some(store) = shared.store.clone() {
        let query = filter.clone();
        let found = tokio::task::spawn_blocking(move || match store.lock() {
            Ok(store) => store.query(&query).map_err(|err| err.to_string()),
            Err(_) => Err("kill store: poisoned lock".to_owned()),
        })
        .await;
        match found {
            Ok(Ok(stored)) => {
                let seen: std::collections::HashSet<u64> =
                    selected.iter().map(|kill| kill.seq).collect();
                selected.extend(stored.into_iter().filter(|kill| !seen.contains(&kill.seq)));
                selected.sort_by_key(|kill| std::cmp::Reverse(kill.seq));
                selected.truncate(filter.limit);
            }
            Ok(Err(err)) => log::warn!("{err}; /kills answered from memory"),
            Err(err) => log::warn!("kill store: {err}; /kills answered from memory"),
        }
    }
    Json(selected).into_response()
}

/// The kill with sequence number `seq`, if it is still kept.
async fn find_kill(shared: &Shared, seq: &str) -> Result<Kill, Response> {
    let seq: u64 = seq.parse().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "the kill's sequence number must be a non-negative integer\n",
        )
            .into_response()
    })?;
    let in_memory = {
        let kills = shared.kills.read().await;
        let found = kills.newest_first().find(|kill| kill.seq == seq).cloned();
        found
    };
    let found = match (in_memory, shared.store.clone()) {
        (Some(kill), _) => Some(kill),
        (None, Some(store)) => tokio::task::spawn_blocking(move || {
            store
                .lock()
                .ok()
                .and_then(|store| store.get(seq).ok().flatten())
        })
        .await
        .ok()
        .flatten(),
        (None, None) => None,
    };
    found.ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!("no kill #{seq} is kept (see /kills for the ones that are)\n"),
        )
            .into_response()
    })
}

async fn kill_json(State(shared): State<Arc<Shared>>, Path(seq): Path<String>) -> Response {
    match find_kill(&shared, &seq).await {
        Ok(kill) => Json(kill).into_response(),
        Err(response) => response,
    }
}

async fn kill_page(State(shared): State<Arc<Shared>>, Path(seq): Path<String>) -> Response {
    match find_kill(&shared, &seq).await {
        Ok(kill) => Html(html::kill(&kill)).into_response(),
        Err(response) => response,
    }
}

async fn index_page(State(shared): State<Arc<Shared>>) -> Html<String> {
    let kills = shared.kills.read().await;
    Html(html::index(kills.newest_first(), &shared.attach_mode))
}

async fn live_page(State(shared): State<Arc<Shared>>) -> Html<String> {
    let live = shared.live.read().await;
    Html(html::live(&live, sys::boot_ns()))
}

async fn healthz(State(shared): State<Arc<Shared>>) -> String {
    format!("ok attach_mode={}\n", shared.attach_mode)
}

/// Binds `addr`; the bound address is returned so `:0` can be used.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
