//! `raftmq console`: the web console (issue #19). One HTTP server (axum) that
//! serves the pages, embedded in the binary so nothing is fetched from anywhere,
//! and the JSON API they call (`api`), backed by the Rust client. This module
//! owns the subcommand, the router, the assets and the headers every answer carries.

mod api;
mod input;
mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub use api::Console;
use input::ApiError;

/// Settings of `raftmq console`.
#[derive(clap::Args)]
pub struct ConsoleArgs {
    #[command(flatten)]
    pub namesrv: crate::NamesrvAddr,
    /// Address to serve the console on (port 0: any free port; the address is
    /// printed). Loopback by default: the console can change the cluster.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}

/// Largest request body: every JSON body the API takes is a few fields.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest an API call may take before it is answered 504: the client's own
/// deadlines (a few seconds per broker group) end sooner, this bounds the rest.
const API_DEADLINE: Duration = Duration::from_secs(30);

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Serves the console until SIGINT/SIGTERM.
pub async fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    let config = crate::tools::client_config(args.namesrv)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the console to {}", args.listen))?;
    // Scripts and tests read the address (with port 0, the one picked) off this line.
    println!("console listening on http://{}/", listener.local_addr()?);
    let token = tokio_util::sync::CancellationToken::new();
    crate::cancel_on_signal(token.clone());
    axum::serve(listener, router(Console::new(config)?))
        .with_graceful_shutdown(token.cancelled_owned())
        .await
        .context("serving the console")
}

/// The pages, the API under `/api`, and the layers every answer goes through.
pub fn router(console: Console) -> Router {
    let api = api::routes()
        .fallback(|| async { ApiError::not_found("no such API path") })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                message: "this API path does not take that method".into(),
            }
        })
        .layer(middleware::from_fn(api_deadline))
        .layer(middleware::map_response(no_store));
    Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX_HTML)))
        .route("/app.js", get(|| asset("text/javascript; charset=utf-8", APP_JS)))
        .route("/style.css", get(|| asset("text/css; charset=utf-8", STYLE_CSS)))
        .nest("/api", api)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response(security_headers))
        .with_state(Arc::new(console))
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// An API call past its deadline is answered rather than left hanging.
async fn api_deadline(req: Request, next: Next) -> Response {
    match tokio::time::timeout(API_DEADLINE, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!("the cluster did not answer within {API_DEADLINE:?}"),
        }
        .into_response(),
    }
}

/// API answers are live state: never cached.
async fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Pages load only their own script and style (nothing from elsewhere, no inline
/// script), and no other site may frame the console (its buttons change the cluster).
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}
