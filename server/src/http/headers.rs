//! TEI's response headers, which tell a client where the time of its request went.

use axum::http::{HeaderMap, HeaderValue};

use super::service::EmbedAnswer;

pub fn timing_headers(answer: &EmbedAnswer, compute_type: &'static str) -> HeaderMap {
    let millis = |d: std::time::Duration| d.as_millis().to_string();
    let values = [
        ("x-compute-type", compute_type.to_string()),
        ("x-compute-time", millis(answer.total_time)),
        ("x-compute-characters", answer.characters.to_string()),
        ("x-compute-tokens", answer.tokens.to_string()),
        ("x-total-time", millis(answer.total_time)),
        ("x-tokenization-time", millis(answer.tokenization_time)),
        ("x-queue-time", millis(answer.queue_time)),
        ("x-inference-time", millis(answer.inference_time)),
    ];
    let mut headers = HeaderMap::new();
    for (name, value) in values {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    headers
}
