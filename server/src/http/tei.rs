//! TEI's routes: `POST /embed` and `POST /tokenize`. Handlers only parse and
//! answer; the service does the rest.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use surf_engine::Truncation;

use super::AppState;
use super::body::{Body, parse};
use super::error::{ApiError, ErrorKind, TeiError};
use super::headers::timing_headers;
use super::service::EmbedOptions;
use super::types::{EmbedRequest, InputItem, SimpleToken, TokenizeRequest, TruncationDirection};

fn truncation(direction: TruncationDirection) -> Truncation {
    match direction {
        TruncationDirection::Left => Truncation::Left,
        TruncationDirection::Right => Truncation::Right,
    }
}

pub async fn embed(State(app): State<AppState>, body: Body) -> Result<Response, TeiError> {
    let request: EmbedRequest = parse(body)?;
    let model = app.service.resolve(request.model.as_deref())?;
    let options = EmbedOptions {
        truncate: request.truncate,
        direction: truncation(request.truncation_direction),
        normalize: request.normalize,
        dimensions: request.dimensions,
    };
    let answer = app
        .service
        .embed_prompted(
            model,
            request.inputs.into_items(),
            options,
            request.prompt_name,
            "inputs",
        )
        .await?;
    let headers = timing_headers(&answer, app.compute_type);
    Ok((headers, Json(answer.vectors)).into_response())
}

pub async fn tokenize(State(app): State<AppState>, body: Body) -> Result<Response, TeiError> {
    let request: TokenizeRequest = parse(body)?;
    let model = app.service.resolve(request.model.as_deref())?;
    let items = request.inputs.into_items();
    app.service.check_count(items.len(), "inputs")?;
    let mut texts = Vec::with_capacity(items.len());
    for item in items {
        match item {
            InputItem::Text(text) => texts.push(text),
            InputItem::Ids(_) => {
                return Err(
                    ApiError::validation("inputs", "/tokenize takes texts, not token ids").into(),
                );
            }
        }
    }
    let engine = std::sync::Arc::clone(app.service.engines().engine(model));
    let add_special = request.add_special_tokens;
    let truncation = if app.service.settings().auto_truncate {
        Truncation::Right
    } else {
        Truncation::None
    };
    let tokens = tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|text| {
                let pieces = engine.tokenizer().pieces(text, truncation, add_special)?;
                Ok(pieces
                    .into_iter()
                    .map(|piece| SimpleToken {
                        id: piece.id,
                        text: piece.text,
                        special: piece.special,
                        start: (!piece.special).then_some(piece.start),
                        stop: (!piece.special).then_some(piece.stop),
                    })
                    .collect::<Vec<_>>())
            })
            .collect::<surf_engine::Result<Vec<_>>>()
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Backend, format!("tokenization failed: {e}")))?
    .map_err(|e| ApiError::new(ErrorKind::Tokenizer, e.to_string()))?;
    Ok(Json(tokens).into_response())
}
