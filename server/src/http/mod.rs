//! The embedding service, shaped as TEI is: handlers that only parse and
//! answer (`tei`, `openai`, `rerank`, `status`), a core that validates, tokenizes and
//! queues (`service`), and the engine's queue with its one engine thread.

mod auth;
mod body;
pub mod error;
mod headers;
pub mod metrics;
mod openai;
mod rerank;
pub mod service;
mod status;
mod tei;
pub mod types;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tokio::net::TcpListener;

pub use openai::base64_floats;
pub use service::{EmbedService, ServiceSettings};

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<EmbedService>,
    pub api_key: Option<String>,
    /// TEI's `x-compute-type`: where the model runs.
    pub compute_type: &'static str,
}

/// HTTP-level settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    pub payload_limit: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            api_key: None,
            payload_limit: 2_000_000,
        }
    }
}

pub fn router(service: Arc<EmbedService>, settings: &HttpSettings) -> Router {
    let compute_type = if service.engine().gpu().is_software() {
        "cpu"
    } else {
        "gpu"
    };
    let state = AppState {
        service,
        api_key: settings.api_key.clone().filter(|key| !key.is_empty()),
        compute_type,
    };
    Router::new()
        .route("/embed", post(tei::embed))
        .route("/tokenize", post(tei::tokenize))
        .route("/rerank", post(rerank::rerank))
        .route("/predict", post(rerank::predict))
        .route("/v1/rerank", post(rerank::cohere_rerank))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/info", get(status::info))
        .route("/health", get(status::health))
        .route("/metrics", get(status::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), count_request))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(DefaultBodyLimit::max(settings.payload_limit))
        .with_state(state)
}

/// Counts every answer by route and status, with its duration.
async fn count_request(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_string(),
        |p| p.as_str().to_string(),
    );
    let response = next.run(request).await;
    app.service
        .metrics()
        .request_answered(&route, response.status().as_u16(), started.elapsed());
    response
}

/// Serves until `shutdown` resolves, then answers every request already
/// accepted before returning.
pub async fn serve(
    listener: TcpListener,
    service: Arc<EmbedService>,
    settings: &HttpSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(Arc::clone(&service), settings);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
