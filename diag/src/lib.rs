//! The diagnostics listener every daemon runs: `/healthz` (the process is alive), `/readyz`
//! (it can serve: storage reachable, listeners bound, an agent's tunnel up) and Prometheus
//! `/metrics`. A crate of its own so that each role (Auth, Proxy, agent) registers its metrics
//! and readiness checks in one place without depending on another role's crate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// A readiness check: `Err(reason)` while the role cannot serve.
pub type ReadyCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Set by the daemon once every role it runs has started; roles add live checks (an agent is
/// ready only while its tunnel is up). Cleared while shutting down.
#[derive(Clone, Default)]
pub struct Readiness {
    started: Arc<AtomicBool>,
    checks: Arc<std::sync::Mutex<Vec<ReadyCheck>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("started", &self.started.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.started.store(ready, Ordering::Release);
    }

    pub fn add_check(&self, check: ReadyCheck) {
        if let Ok(mut c) = self.checks.lock() {
            c.push(check);
        }
    }

    /// `Ok` when started and every check passes; else the reasons.
    pub fn get(&self) -> Result<(), String> {
        if !self.started.load(Ordering::Acquire) {
            return Err("starting or stopping".into());
        }
        let checks = self
            .checks
            .lock()
            .map_err(|_| "readiness checks poisoned".to_string())?;
        let failed: Vec<String> = checks.iter().filter_map(|c| c().err()).collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}

/// The registry `/metrics` encodes, handed over once the daemon has built it: the listener
/// can start first (so `/healthz` and `/readyz` answer while the roles start, e.g. while Auth
/// waits for its database), with `/metrics` empty until then.
#[derive(Clone, Default)]
pub struct Metrics(Arc<std::sync::OnceLock<Registry>>);

impl Metrics {
    /// Metrics from `registry`, at once.
    pub fn new(registry: Registry) -> Self {
        let m = Self::default();
        m.set(registry);
        m
    }

    /// Serve `registry` from now on; false if one was given already (it stays).
    pub fn set(&self, registry: Registry) -> bool {
        self.0.set(registry).is_ok()
    }
}

#[derive(Clone)]
struct DiagState {
    metrics: Metrics,
    ready: Readiness,
}

/// Bind the diagnostics listener; returns the bound address and the server future.
pub async fn bind(
    addr: SocketAddr,
    metrics: Metrics,
    ready: Readiness,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(serve_metrics))
        .with_state(DiagState { metrics, ready });
    Ok((local, async move { axum::serve(listener, app).await }))
}

async fn readyz(State(s): State<DiagState>) -> impl IntoResponse {
    match s.ready.get() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn serve_metrics(State(s): State<DiagState>) -> impl IntoResponse {
    let mut body = String::new();
    let encoded = match s.metrics.0.get() {
        Some(registry) => prometheus_client::encoding::text::encode(&mut body, registry),
        None => Ok(()),
    };
    match encoded {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            String::new(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[test]
    fn readiness_needs_the_start_and_every_check() {
        let r = Readiness::default();
        assert_eq!(r.get(), Err("starting or stopping".into()));
        r.set(true);
        assert_eq!(r.get(), Ok(()));
        r.add_check(Box::new(|| Err("agent tunnel is down".into())));
        r.add_check(Box::new(|| Ok(())));
        assert_eq!(r.get(), Err("agent tunnel is down".into()));
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let mut registry = Registry::default();
        let c = prometheus_client::metrics::counter::Counter::<u64>::default();
        c.inc();
        registry.register("gatehouse_test_things", "Things", c);
        let ready = Readiness::default();
        let metrics = Metrics::default();
        let (addr, server) = bind(
            "127.0.0.1:0".parse().unwrap(),
            metrics.clone(),
            ready.clone(),
        )
        .await
        .unwrap();
        let task = tokio::spawn(server);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        // Before the daemon hands its registry over: empty, not an error.
        let early = get(addr, "/metrics").await;
        assert!(early.starts_with("HTTP/1.1 200"), "{early}");
        assert!(!early.contains("gatehouse_test_things"), "{early}");
        assert!(metrics.set(registry));
        assert!(!metrics.set(Registry::default()), "set once");
        ready.set(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await;
        assert!(
            metrics.contains("gatehouse_test_things_total 1"),
            "{metrics}"
        );
        task.abort();
    }
}
