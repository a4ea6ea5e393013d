//! The metrics endpoint every raftmq process serves apart from its gRPC ports:
//! `GET /metrics` answers the process's prometheus-client registry in the
//! OpenMetrics text format (which Prometheus scrapes natively) over plain
//! HTTP/1.1, with hyper, which tonic already brings. Also the counting of client
//! connections on a gRPC port. Here because the broker and the NameServer both
//! serve it and this is the one crate both depend on.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

/// Where `raftmq broker`, `raftmq namesrv` and `raftmq dev` put a process's
/// metrics endpoint by default: its gRPC port plus this (10911 -> 30911,
/// 9876 -> 29876), below the Raft ports' +30000.
pub const METRICS_PORT_OFFSET: u16 = 20000;

/// What Prometheus is told the body is (prometheus-client writes OpenMetrics 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry as OpenMetrics text. An encoding error can only come from a
/// collector; it is logged and the scrape gets what was written before it.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding the metrics failed");
    }
    out
}

fn answer(req: &Request<hyper::body::Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, CONTENT_TYPE, render(registry)),
        (&Method::GET, "/") => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "raftmq metrics: GET /metrics\n".to_owned(),
        ),
        (&Method::GET, _) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics\n".to_owned(),
        ),
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is served\n".to_owned(),
        ),
    }
}

/// Serves `registry` on `listener` until `shutdown` fires; open scrape
/// connections are dropped then, so none outlives the process's state.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, shutdown: CancellationToken) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            // Reap finished connections so the set does not grow with every scrape.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = answer(&req, &registry);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
    connections.shutdown().await;
}

/// A gRPC port's connection, counted in `open` while it lives.
pub struct Counted<IO> {
    io: IO,
    open: Gauge,
}

impl<IO> Drop for Counted<IO> {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Client connections of one gRPC port: open now, and accepted since start.
#[derive(Debug, Clone, Default)]
pub struct ConnectionCounts {
    pub open: Gauge,
    pub accepted: Counter,
}

impl ConnectionCounts {
    /// Registers both as `raftmq_client_connections` and
    /// `raftmq_client_connections_accepted_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "raftmq_client_connections",
            "Client connections open on the gRPC client port",
            self.open.clone(),
        );
        registry.register(
            "raftmq_client_connections_accepted",
            "Client connections accepted on the gRPC client port since start",
            self.accepted.clone(),
        );
    }

    /// `incoming` with every connection counted: two atomic adds per accept and
    /// one per close, nothing per request.
    pub fn count<S, IO, E>(&self, incoming: S) -> impl Stream<Item = Result<Counted<IO>, E>> + use<S, IO, E>
    where
        S: Stream<Item = Result<IO, E>>,
    {
        let counts = self.clone();
        incoming.map(move |accepted| {
            accepted.map(|io| {
                counts.open.inc();
                counts.accepted.inc();
                Counted {
                    io,
                    open: counts.open.clone(),
                }
            })
        })
    }
}
