//! The cross-encoder routes: TEI's `POST /rerank` and `POST /predict`, and
//! the Cohere/Jina-style `POST /v1/rerank` that RAG frameworks call. Handlers
//! only parse and answer; the service validates, tokenizes and queues.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use surf_engine::Truncation;
use surf_engine::engine::{label_scores, rank};

use super::AppState;
use super::body::{Body, parse};
use super::error::{ApiError, OpenAiError, TeiError};
use super::headers::timing_headers;
use super::service::{ClassifierItem, ScoreRequestOptions};
use super::types::{
    CohereRerankRequest, CohereRerankResponse, CohereRerankResult, CohereUsage, Document,
    DocumentText, LabelScore, PredictInput, PredictRequest, PredictResponse, Rank, RerankRequest,
    Sequence, TruncationDirection,
};

fn truncation(direction: TruncationDirection) -> Truncation {
    match direction {
        TruncationDirection::Left => Truncation::Left,
        TruncationDirection::Right => Truncation::Right,
    }
}

/// The one score of each input of a one-label model.
fn single_scores(vectors: Vec<Vec<f32>>) -> Result<Vec<f32>, ApiError> {
    vectors
        .into_iter()
        .map(|scores| match scores.as_slice() {
            [score] => Ok(*score),
            other => Err(ApiError::new(
                super::error::ErrorKind::Backend,
                format!("the reranker gave {} scores for one pair", other.len()),
            )),
        })
        .collect()
}

pub async fn rerank(State(app): State<AppState>, body: Body) -> Result<Response, TeiError> {
    let request: RerankRequest = parse(body)?;
    let options = ScoreRequestOptions {
        truncate: request.truncate,
        direction: truncation(request.truncation_direction),
        raw_scores: request.raw_scores,
    };
    let model = app.service.resolve(request.model.as_deref())?;
    let texts = request.return_text.then(|| request.texts.clone());
    let answer = app
        .service
        .rerank(model, request.query, request.texts, options, "texts")
        .await?;
    let headers = timing_headers(&answer, app.compute_type);
    let scores = single_scores(answer.vectors)?;
    let ranks: Vec<Rank> = rank(&scores)
        .into_iter()
        .map(|(index, score)| Rank {
            index,
            text: texts.as_ref().map(|texts| texts[index].clone()),
            score,
        })
        .collect();
    Ok((headers, Json(ranks)).into_response())
}

pub async fn predict(State(app): State<AppState>, body: Body) -> Result<Response, TeiError> {
    let request: PredictRequest = parse(body)?;
    let options = ScoreRequestOptions {
        truncate: request.truncate,
        direction: truncation(request.truncation_direction),
        raw_scores: request.raw_scores,
    };
    let model = app.service.resolve(request.model.as_deref())?;
    let (single, sequences) = match request.inputs {
        PredictInput::Single(sequence) => (true, vec![sequence]),
        PredictInput::Batch(sequences) => (false, sequences),
    };
    let items = sequences
        .into_iter()
        .map(|sequence| match sequence {
            Sequence::Single(text) => ClassifierItem::Text(text),
            Sequence::Pair(first, second) => ClassifierItem::Pair(first, second),
        })
        .collect();
    let answer = app.service.predict(model, items, options, "inputs").await?;
    let headers = timing_headers(&answer, app.compute_type);
    let labels = app
        .service
        .engines()
        .engine(model)
        .classifier_labels()
        .map(<[String]>::to_vec)
        .unwrap_or_default();
    let mut predictions: Vec<Vec<LabelScore>> = answer
        .vectors
        .into_iter()
        .map(|scores| {
            label_scores(scores, &labels)
                .into_iter()
                .map(|p| LabelScore {
                    score: p.score,
                    label: p.label,
                })
                .collect()
        })
        .collect();
    let response = match (single, predictions.len()) {
        (true, 1) => PredictResponse::Single(predictions.swap_remove(0)),
        _ => PredictResponse::Batch(predictions),
    };
    Ok((headers, Json(response)).into_response())
}

pub async fn cohere_rerank(
    State(app): State<AppState>,
    body: Body,
) -> Result<Response, OpenAiError> {
    let request: CohereRerankRequest = parse(body)?;
    if request.top_n == Some(0) {
        return Err(ApiError::validation("top_n", "top_n must be at least 1").into());
    }
    let model = app.service.resolve(request.model.as_deref())?;
    let texts: Vec<String> = request
        .documents
        .into_iter()
        .map(Document::into_text)
        .collect();
    let documents = request.return_documents.then(|| texts.clone());
    let options = ScoreRequestOptions {
        truncate: None,
        direction: Truncation::Right,
        raw_scores: false,
    };
    let answer = app
        .service
        .rerank(model, request.query, texts, options, "documents")
        .await?;
    let headers = timing_headers(&answer, app.compute_type);
    let tokens = answer.tokens;
    let scores = single_scores(answer.vectors)?;
    let top_n = request.top_n.unwrap_or(scores.len());
    let results = rank(&scores)
        .into_iter()
        .take(top_n)
        .map(|(index, relevance_score)| CohereRerankResult {
            index,
            relevance_score,
            document: documents.as_ref().map(|documents| DocumentText {
                text: documents[index].clone(),
            }),
        })
        .collect();
    let response = CohereRerankResponse {
        results,
        model: app.service.name_of(model),
        usage: CohereUsage {
            total_tokens: tokens,
        },
    };
    Ok((headers, Json(response)).into_response())
}
