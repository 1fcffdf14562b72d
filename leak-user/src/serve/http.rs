//! `/metrics`, `/kills` and `/healthz`, served concurrently with graceful shutdown.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use tokio::{net::TcpListener, sync::RwLock};

use super::metrics::Metrics;
use crate::{model::kill::Kill, store::RecentKills};

/// What the handlers read.
pub struct Shared {
    pub metrics: Metrics,
    pub kills: RwLock<RecentKills>,
    pub attach_mode: String,
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
        .route("/healthz", get(healthz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    match shared.metrics.render() {
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

/// The most recent kills, newest first; `?limit=N` caps the count.
async fn kills(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<KillsQuery>,
) -> Json<Vec<Kill>> {
    let kills = shared.kills.read().await;
    let limit = query.limit.unwrap_or(usize::MAX);
    Json(kills.newest_first().take(limit).cloned().collect())
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
