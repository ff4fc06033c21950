//! The accept loop: every connection gets a head-read timer (which also closes kept-alive
//! connections left idle), the number of open connections is capped, and shutdown stops
//! accepting, asks every connection to finish, and drops those still open at its deadline.
//! (`axum::serve` has none of these: a client that sends half a request head would hold its
//! connection, and a graceful shutdown, forever.)

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::ConnectionLimits;

/// What a connection over `--max-connections` is told before it is closed.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 96\r\n\r\n\
{\"error\":\"too many open connections (--max-connections); retry later\",\"error_type\":\"overloaded\"}";

/// Serves `app` on `listener` until `shutdown` resolves, then drains within the deadline.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Reaps finished connections so the set stays as large as what is open.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Refused without waiting: the socket is closed right after this write.
                    let _ = stream.try_write(OVER_CAPACITY);
                    tracing::warn!(max = limits.max_connections, "connection refused: --max-connections reached");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // The peer address travels with each request, as axum's ConnectInfo: edits are
                // charged to it when they send no configured key. Inserted per request rather
                // than by `Router::layer`, which would re-wrap every route per connection.
                let router = TowerToHyperService::new(app.clone());
                let with_peer = hyper::service::service_fn(
                    move |mut request: hyper::Request<hyper::body::Incoming>| {
                        request
                            .extensions_mut()
                            .insert(axum::extract::ConnectInfo(peer));
                        hyper::service::Service::call(&router, request)
                    },
                );
                let connection = http.serve_connection(TokioIo::new(stream), with_peer);
                let mut stop = stop_rx.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    tokio::pin!(connection);
                    let stopping = async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    };
                    tokio::select! {
                        result = connection.as_mut() => {
                            if let Err(e) = result {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        }
                        _ = stopping => {
                            // Answers what is in flight, then closes (an idle one at once).
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(limits.shutdown_deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            deadline_s = limits.shutdown_deadline.as_secs_f64(),
            "shutdown deadline passed: dropping the connections still open"
        );
        connections.shutdown().await;
    }
    Ok(())
}
