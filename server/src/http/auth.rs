//! `--api-key`: every route but `/health` and `/metrics` asks for
//! `Authorization: Bearer <key>`.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use super::error::{ApiError, ErrorKind};

const OPEN_ROUTES: &[&str] = &["/health", "/metrics"];

/// Whether a path is answered in OpenAI's error shape.
pub fn is_openai_route(path: &str) -> bool {
    path.starts_with("/v1/") || path == "/embeddings"
}

/// Compares without stopping at the first difference, so that answer times
/// do not tell how much of a guess was right.
fn same_key(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (i, &byte) in expected.iter().enumerate() {
        difference |= usize::from(byte ^ given.get(i).copied().unwrap_or(0));
    }
    difference == 0
}

pub async fn require_key(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = app.api_key.as_deref() else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if OPEN_ROUTES.contains(&path) {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if given.is_some_and(|key| same_key(key.trim().as_bytes(), expected.as_bytes())) {
        return next.run(request).await;
    }
    let error = ApiError::new(
        ErrorKind::Unauthorized,
        if given.is_some() {
            "the API key is wrong"
        } else {
            "an API key is required: send `Authorization: Bearer <key>`"
        },
    );
    if is_openai_route(path) {
        error.openai()
    } else {
        error.tei()
    }
}

#[cfg(test)]
mod tests {
    use super::same_key;

    #[test]
    fn keys_match_only_when_equal() {
        assert!(same_key(b"secret", b"secret"));
        assert!(!same_key(b"secreT", b"secret"));
        assert!(!same_key(b"secret!", b"secret"));
        assert!(!same_key(b"", b"secret"));
        assert!(!same_key(b"secre", b"secret"));
    }
}
