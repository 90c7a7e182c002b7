//! `GET /info`, `GET /health` and `GET /metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::{ApiError, ErrorKind};
use super::types::Info;

pub async fn info(State(app): State<AppState>) -> Json<Info> {
    let service = &app.service;
    let engine = service.engine();
    let settings = service.settings();
    let cache = engine.cache_info().ok();
    Json(Info {
        model_id: service.model_name(),
        model_sha: engine.revision().map(str::to_string),
        model_dtype: "float32",
        model_type: "embedding",
        dimension: engine.dimension(),
        pooling: format!("{:?}", engine.pooling()).to_lowercase(),
        normalize_default: true,
        max_input_length: engine.spec().max_seq_length,
        max_concurrent_requests: settings.max_concurrent_requests,
        max_batch_tokens: settings.batch.max_batch_tokens,
        max_batch_requests: settings.batch.max_batch_requests,
        max_client_batch_size: settings.max_client_batch_size,
        auto_truncate: settings.auto_truncate,
        vram_budget_bytes: cache.as_ref().and_then(|c| c.budget_bytes),
        vram_layer_slots: cache.as_ref().map_or(0, |c| c.layer_slots),
        layers: engine.spec().config.num_layers(),
        adapter: engine.gpu().adapter_name().to_string(),
        version: env!("CARGO_PKG_VERSION"),
    })
}

pub async fn health(State(app): State<AppState>) -> Response {
    if app.service.check_health().await {
        StatusCode::OK.into_response()
    } else {
        ApiError::new(ErrorKind::Unhealthy, "the engine is failing").tei()
    }
}

pub async fn metrics(State(app): State<AppState>) -> Response {
    let service = &app.service;
    if let Ok(stats) = service.engine().inference_stats() {
        service.metrics().sync_pager(&stats);
    }
    service.metrics().set_queue_size(service.waiting());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        service.metrics().encode(),
    )
        .into_response()
}
