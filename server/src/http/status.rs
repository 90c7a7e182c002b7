//! `GET /info`, `GET /health` and `GET /metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::{ApiError, ErrorKind};
use super::service::EmbedService;
use super::types::{Info, ModelInfo};

/// What every model holds now, as `/info` lists it.
fn model_infos(service: &EmbedService) -> Vec<ModelInfo> {
    let engines = service.engines();
    let default = engines.default_index();
    let residency = engines.residency().unwrap_or_default();
    (0..engines.len())
        .map(|model| {
            let engine = engines.engine(model);
            let held = residency.get(model);
            ModelInfo {
                id: engines.name(model).to_string(),
                default: model == default,
                family: engine.family().name(),
                model_type: engine.model_kind().name(),
                dimension: engine.dimension(),
                dtype: engine.weight_dtype().name(),
                max_input_length: engine.spec().max_seq_length,
                layers: engine.spec().config.num_layers(),
                resident_layers: held.map_or(0, |r| r.resident_layers),
                pinned_resident: held.is_some_and(|r| r.pinned_resident),
                vram_used_bytes: engine.vram_in_use(),
                vram_whole_bytes: held.map_or(0, |r| r.whole_bytes),
            }
        })
        .collect()
}

pub async fn info(State(app): State<AppState>) -> Json<Info> {
    let service = &app.service;
    let engine = service.engine();
    let engines = service.engines();
    let settings = service.settings();
    let cache = engine.cache_info().ok();
    let default = engines.default_index();
    Json(Info {
        model_id: service.model_name(),
        model_sha: engine.revision().map(str::to_string),
        model_dtype: "float32",
        model_type: service.model_kind(default).name(),
        labels: engine.classifier_labels().map(<[String]>::to_vec),
        dimension: engine.dimension(),
        pooling: format!("{:?}", engine.pooling()).to_lowercase(),
        normalize_default: true,
        max_input_length: engine.spec().max_seq_length,
        max_concurrent_requests: settings.max_concurrent_requests,
        max_batch_tokens: settings.batch.max_batch_tokens,
        max_batch_requests: settings.batch.max_batch_requests,
        max_client_batch_size: settings.max_client_batch_size,
        auto_truncate: settings.auto_truncate,
        vram_budget_bytes: engines
            .vram_budget()
            .or_else(|| cache.as_ref().and_then(|c| c.budget_bytes)),
        vram_layer_slots: cache.as_ref().map_or(0, |c| c.layer_slots),
        layers: engine.spec().config.num_layers(),
        adapter: engine.gpu().adapter_name().to_string(),
        version: env!("CARGO_PKG_VERSION"),
        models: model_infos(service),
        vram_used_bytes: engines.vram_in_use(),
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
    let engines = service.engines();
    let metrics = service.metrics();
    for model in 0..engines.len() {
        let engine = engines.engine(model);
        if let Ok(stats) = engine.inference_stats() {
            metrics.sync_pager(model, &stats);
        }
        metrics.set_vram(model, engine.vram_in_use(), engines.granted_bytes(model));
    }
    metrics.set_vram_total(engines.vram_in_use(), engines.vram_budget());
    metrics.set_queue_size(service.waiting());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        service.metrics().encode(),
    )
        .into_response()
}
