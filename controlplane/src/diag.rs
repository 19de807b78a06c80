//! The diagnostics listener every daemon runs: `/healthz` (the process is alive), `/readyz`
//! (it can serve: storage reachable, listeners bound) and Prometheus `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
pub use prometheus_client::registry::Registry;

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

#[derive(Clone)]
struct DiagState {
    registry: Arc<Registry>,
    ready: Readiness,
}

/// Bind the diagnostics listener; returns the bound address and the server future.
pub async fn bind(
    addr: SocketAddr,
    registry: Arc<Registry>,
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
        .route("/metrics", get(metrics))
        .with_state(DiagState { registry, ready });
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

async fn metrics(State(s): State<DiagState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
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
