//! `/metrics`, `/kills` and `/healthz`, served concurrently with graceful shutdown.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Path, Query, State},
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
use crate::{model::kill::Kill, store::RecentKills, sys};

/// What the handlers read.
pub struct Shared {
    pub metrics: Metrics,
    pub kills: RwLock<RecentKills>,
    pub attach_mode: String,
    /// The watched cgroups' recent points, refreshed by the agent every second.
    pub live: RwLock<Vec<LiveSeries>>,
}

impl Shared {
    /// Counts the kill and keeps it for `/kills`.
    pub async fn publish_kill(&self, kill: Kill) {
        self.metrics.record_kill(&kill);
        self.kills.write().await.push(kill);
    }
}

#[derive(Debug, serde::Deserialize)]
struct KillsQuery {
    limit: Option<usize>,
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

/// The most recent kills, newest first; `?limit=N` caps the count.
async fn kills(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<KillsQuery>,
) -> Json<Vec<Kill>> {
    let kills = shared.kills.read().await;
    let limit = query.limit.unwrap_or(usize::MAX);
    Json(kills.newest_first().take(limit).cloned().collect())
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
    let kills = shared.kills.read().await;
    let found = kills.newest_first().find(|kill| kill.seq == seq).cloned();
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
