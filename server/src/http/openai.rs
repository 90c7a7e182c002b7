//! The OpenAI routes: embeddings, `POST /v1/embeddings` (also
//! `/embeddings`), and the models served, `GET /v1/models`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use surf_engine::Truncation;

use super::AppState;
use super::body::{Body, parse};
use super::error::OpenAiError;
use super::headers::timing_headers;
use super::service::EmbedOptions;
use super::types::{
    EncodedEmbedding, EncodingFormat, ModelCard, ModelList, OpenAiEmbedding, OpenAiRequest,
    OpenAiResponse, OpenAiUsage,
};

/// Every model served, in OpenAI's list shape.
pub async fn models(State(app): State<AppState>) -> Json<ModelList> {
    let created = app.service.started();
    let data = app
        .service
        .engines()
        .names()
        .into_iter()
        .map(|id| ModelCard {
            id,
            object: "model",
            created,
            owned_by: "surf",
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

/// The raw little-endian bytes of the floats, in standard base64.
pub fn base64_floats(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub async fn embeddings(State(app): State<AppState>, body: Body) -> Result<Response, OpenAiError> {
    let request: OpenAiRequest = parse(body)?;
    let model = app.service.resolve(request.model.as_deref())?;
    let options = EmbedOptions {
        truncate: None,
        direction: Truncation::Right,
        normalize: true,
        dimensions: request.dimensions,
    };
    let answer = app
        .service
        .embed(model, request.input.into_items(), options, "input")
        .await?;
    let format = request.encoding_format.unwrap_or_default();
    let headers = timing_headers(&answer, app.compute_type);
    let data = answer
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| OpenAiEmbedding {
            object: "embedding",
            index,
            embedding: match format {
                EncodingFormat::Float => EncodedEmbedding::Float(vector),
                EncodingFormat::Base64 => EncodedEmbedding::Base64(base64_floats(&vector)),
            },
        })
        .collect();
    let response = OpenAiResponse {
        object: "list",
        data,
        model: app.service.name_of(model),
        usage: OpenAiUsage {
            prompt_tokens: answer.tokens,
            total_tokens: answer.tokens,
        },
    };
    Ok((headers, Json(response)).into_response())
}
