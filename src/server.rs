//! Accept loops and graceful shutdown.
//!
//! [`run`] takes already-bound listeners (so tests bind `127.0.0.1:0`) and a
//! shutdown future. When it fires: stop accepting, let in-flight requests
//! finish (up to 30 s), then finish queued commits and close the store.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::app::App;
use crate::http::{Listener, handle};

/// How long in-flight requests get once shutdown starts.
pub const DRAIN: Duration = Duration::from_secs(30);

/// Serves `api` (and `metrics`, if given) until `shutdown` resolves.
pub async fn run(
    api: TcpListener,
    metrics: Option<TcpListener>,
    app: App,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let snapshots = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(app.config().snapshot_interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                app.writer().request_snapshot();
            }
        })
    };
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = api.accept() => r.map(|(s, p)| (s, p, Listener::Api)),
            r = accept_opt(&metrics) => r.map(|(s, p)| (s, p, Listener::Metrics)),
            () = &mut shutdown => break,
        };
        let (stream, peer, which) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(&app, req, peer, which).await) }
        });
        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    snapshots.abort();
    drop(api);
    drop(metrics);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!("in-flight requests did not finish within {DRAIN:?}");
    }
    app.close().await;
    tracing::info!("store closed");
}

async fn accept_opt(l: &Option<TcpListener>) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
