//! `/metrics` (Prometheus text) and `/healthz`.

use crate::Metrics;
use anyhow::{Context, Result};
use axum::{routing::get, Router};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub async fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
            }),
        );
    tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "http endpoint failed");
        }
    });
    tracing::info!(%local, "serving /metrics and /healthz");
    Ok(local)
}
