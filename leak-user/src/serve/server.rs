//! The HTTP server: TLS and basic auth from the web configuration, and bounds on what clients
//! can hold. Connections are capped; at the cap the connection idle the longest is closed to
//! make room, so a client holding hundreds of idle or half-sent connections cannot keep a scrape
//! or `/healthz` out. Headers must arrive within a timeout and fit a buffer, a TLS handshake
//! must finish within one, and an idle keep-alive connection is closed.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::Request,
    http::{header, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Router,
};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use log::{debug, warn};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{oneshot, watch},
};
use tokio_rustls::TlsAcceptor;

use super::webconfig::{BasicAuth, WebConfig};

/// What a client may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections; at the cap the longest idle one is closed for a new one.
    pub max_connections: usize,
    /// A request's headers must arrive within this.
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// The TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Bytes of request line and headers a connection may buffer (hyper's minimum is 8 KiB).
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// One open connection, as the accept loop sees it.
struct Tracked {
    /// When it last finished a response (or was accepted).
    idle_since: Instant,
    /// Requests in flight.
    busy: usize,
    close: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Connections {
    next: u64,
    open: HashMap<u64, Tracked>,
}

type Registry = Arc<Mutex<Connections>>;

impl Connections {
    /// Closes the connection idle the longest (none with a request in flight); whether there
    /// was one.
    fn evict_idlest(&mut self) -> bool {
        let idlest = self
            .open
            .iter_mut()
            .filter(|(_, c)| c.busy == 0 && c.close.is_some())
            .min_by_key(|(_, c)| c.idle_since);
        match idlest {
            Some((_, connection)) => {
                if let Some(close) = connection.close.take() {
                    let _ = close.send(());
                }
                true
            }
            None => false,
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true, then lets requests in flight finish
/// (for up to 5 s).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    web: WebConfig,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let app = with_web_config(app, &web);
    let tls = web.tls.map(TlsAcceptor::from);
    let registry: Registry = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, say: wait rather than spin.
                warn!("HTTP accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (id, close_rx) = {
            let Ok(mut connections) = registry.lock() else {
                continue;
            };
            if connections.open.len() >= limits.max_connections && !connections.evict_idlest() {
                debug!(
                    "HTTP: {peer} refused, {} requests in flight",
                    limits.max_connections
                );
                continue;
            }
            let (close_tx, close_rx) = oneshot::channel();
            connections.next += 1;
            let id = connections.next;
            connections.open.insert(
                id,
                Tracked {
                    idle_since: Instant::now(),
                    busy: 0,
                    close: Some(close_tx),
                },
            );
            (id, close_rx)
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            id,
            peer,
            registry: registry.clone(),
            app: app.clone(),
            limits,
            stop: stop.clone(),
        };
        let tls = tls.clone();
        let finished = registry.clone();
        tasks.spawn(async move {
            let mut close_rx = close_rx;
            match tls {
                None => connection.run(stream, close_rx).await,
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    let handshake = tokio::time::timeout(limits.handshake_timeout, handshake);
                    tokio::select! {
                        result = handshake => match result {
                            Ok(Ok(stream)) => connection.run(stream, close_rx).await,
                            Ok(Err(err)) => debug!("HTTP: TLS handshake with {peer}: {err}"),
                            Err(_) => debug!("HTTP: TLS handshake with {peer} timed out"),
                        },
                        // Closed for a newer connection before it said anything.
                        _ = &mut close_rx => {}
                    }
                }
            }
            if let Ok(mut connections) = finished.lock() {
                connections.open.remove(&id);
            }
        });
        // Reap finished connections as we go.
        while tasks.try_join_next().is_some() {}
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
}

/// Basic auth and extra headers around the routes.
fn with_web_config(app: Router, web: &WebConfig) -> Router {
    let headers: Vec<(HeaderName, HeaderValue)> = web
        .headers
        .iter()
        .filter_map(|(name, value)| {
            Some((
                HeaderName::try_from(name.as_str()).ok()?,
                HeaderValue::try_from(value.as_str()).ok()?,
            ))
        })
        .collect();
    let auth: Option<Arc<BasicAuth>> = web.auth.clone();
    app.layer(axum::middleware::from_fn(
        move |request: Request, next: axum::middleware::Next| {
            let auth = auth.clone();
            let headers = headers.clone();
            async move {
                if let Some(auth) = auth {
                    let value = request
                        .headers()
                        .get(header::AUTHORIZATION)
                        .and_then(|value| value.to_str().ok());
                    if !auth.allows(value).await {
                        return (
                            StatusCode::UNAUTHORIZED,
                            [(header::WWW_AUTHENTICATE, "Basic realm=\"leak\"")],
                            "unauthorized: this endpoint needs basic auth (see the web config)\n",
                        )
                            .into_response();
                    }
                }
                let mut response = next.run(request).await;
                for (name, value) in headers {
                    response.headers_mut().insert(name, value);
                }
                response
            }
        },
    ))
}

struct Connection {
    id: u64,
    peer: SocketAddr,
    registry: Registry,
    app: Router,
    limits: Limits,
    stop: watch::Receiver<bool>,
}

impl Connection {
    async fn run<S>(self, stream: S, mut close: oneshot::Receiver<()>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = Tracking {
            id: self.id,
            registry: self.registry.clone(),
            inner: TowerToHyperService::new(self.app.clone()),
        };
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout)
            .max_buf_size(self.limits.max_header_bytes)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let mut stop = self.stop.clone();
        let mut idle_check = tokio::time::interval(self.limits.idle_timeout / 4);
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        debug!("HTTP: connection from {}: {err}", self.peer);
                    }
                    return;
                }
                // No request in flight: dropped at once, whatever it half-sent.
                _ = &mut close => {
                    debug!("HTTP: closing the idle connection from {} for a new one", self.peer);
                    return;
                }
                _ = idle_check.tick() => {
                    if self.idle_for() >= self.limits.idle_timeout {
                        return;
                    }
                }
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        // Shutting down: the request in flight, if any, is answered first.
        connection.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    }

    /// How long it has had no request in flight (zero while it has one).
    fn idle_for(&self) -> Duration {
        self.registry
            .lock()
            .ok()
            .and_then(|connections| {
                let tracked = connections.open.get(&self.id)?;
                (tracked.busy == 0).then(|| tracked.idle_since.elapsed())
            })
            .unwrap_or_default()
    }
}

/// The router as a hyper service that tells the registry when a request is in flight.
#[derive(Clone)]
struct Tracking {
    id: u64,
    registry: Registry,
    inner: TowerToHyperService<Router>,
}

impl Tracking {
    fn update(&self, change: impl FnOnce(&mut Tracked)) {
        if let Ok(mut connections) = self.registry.lock() {
            if let Some(tracked) = connections.open.get_mut(&self.id) {
                change(tracked);
            }
        }
    }
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracking {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        self.update(|tracked| tracked.busy += 1);
        let this = self.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            this.update(|tracked| {
                tracked.busy = tracked.busy.saturating_sub(1);
                tracked.idle_since = Instant::now();
            });
            response
        })
    }
}
