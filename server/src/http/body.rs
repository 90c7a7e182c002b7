//! Reading a JSON body under `--payload-limit`, with every failure an
//! [`ApiError`] of the right kind instead of axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorKind};

pub type Body = Result<Bytes, BytesRejection>;

pub fn parse<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorKind::PayloadTooLarge,
                "the request body is larger than the payload limit (--payload-limit)",
            )
        } else {
            ApiError::new(ErrorKind::MalformedJson, rejection.body_text())
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|error| {
        let kind = match error.classify() {
            serde_json::error::Category::Data => ErrorKind::Validation,
            _ => ErrorKind::MalformedJson,
        };
        ApiError::new(kind, format!("invalid request body: {error}"))
    })
}
