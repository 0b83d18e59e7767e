//! Accept loops and graceful shutdown.
//!
//! [`run`] takes already-bound listeners (so tests bind `127.0.0.1:0`) and a
//! shutdown future. When it fires: stop accepting, let in-flight requests
//! finish (up to 30 s), then finish queued commits and close the store.
//!
//! Each listener admits at most `max_connections` connections at once; one
//! more is closed as soon as it is accepted (and counted), so a flood on
//! one listener neither grows memory nor disturbs connections already
//! served, nor the other listener. Every connection is held to the request
//! head and idle timeouts of [`conn`].

pub mod conn;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use self::conn::{Activity, Limits, Watched};

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
    let limits = Limits { head: app.config().header_read_timeout, idle: app.config().idle_timeout };
    // hyper's own head timer starts when a connection goes idle; as a
    // backstop behind the finer clocks of `conn`, it gets both periods.
    let backstop = limits.idle + limits.head + Duration::from_secs(1);
    let slots =
        [Listener::Api, Listener::Metrics].map(|_| Arc::new(Semaphore::new(app.config().max_connections)));
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
        let Ok(slot) = slots[which as usize].clone().try_acquire_owned() else {
            // Over the cap: closed at once, before reading anything.
            drop(stream);
            app.metrics().count_refused_connection(which);
            tracing::debug!(%peer, listener = ?which, "connection refused: too many open connections");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let io = TokioIo::new(Watched::new(stream, activity.clone(), limits));
        let counted = app.clone();
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            let in_flight = activity.begin();
            async move {
                let reply = handle(&app, req, peer, which).await;
                drop(in_flight);
                Ok::<_, std::convert::Infallible>(reply)
            }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(backstop)
            .serve_connection(io, service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            counted.metrics().connection_opened(which);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            counted.metrics().connection_closed(which);
            drop(slot);
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
