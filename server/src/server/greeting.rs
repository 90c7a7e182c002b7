//! The server side of the handshake: the client's version, token, model and
//! weight dtype checked before anything is sent, and the manifest of the
//! model asked for or a refusal in reply.

use std::sync::Arc;

use surf_transport::wire::{
    self, Hello, HelloReply, PROTOCOL_VERSION, Refusal, close_code, limits,
};

use super::{REFUSAL_LINGER, REQUEST_TIMEOUT, Served, Shared};

/// Runs the server side of the handshake; the model and dtype the client
/// is served, or `None` when the connection was refused (and closed).
pub(super) async fn greet(connection: &quinn::Connection, shared: &Shared) -> Option<Arc<Served>> {
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, connection.accept_bi()).await;
    let Ok(Ok((mut send, mut recv))) = stream else {
        shared.stats.connections_refused.increment();
        connection.close(close_code::PROTOCOL_VIOLATION.into(), b"no hello");
        return None;
    };
    let hello = tokio::time::timeout(REQUEST_TIMEOUT, read_hello(&mut recv)).await;
    let hello = match hello {
        Ok(Ok(hello)) => hello,
        Ok(Err(error)) => {
            let (refusal, code) = match &error {
                surf_transport::Error::VersionMismatch { remote, .. } => {
                    tracing::warn!(peer = %connection.remote_address(), client_version = remote, "client speaks another protocol version");
                    (
                        Refusal::VersionMismatch {
                            server_version: PROTOCOL_VERSION,
                        },
                        close_code::VERSION_MISMATCH,
                    )
                }
                _ => (
                    Refusal::Malformed {
                        detail: error.to_string(),
                    },
                    close_code::PROTOCOL_VIOLATION,
                ),
            };
            let reason = error.to_string();
            shared.stats.connections_refused.increment();
            refuse(connection, &mut send, refusal, code, &reason).await;
            return None;
        }
        Err(_) => {
            shared.stats.connections_refused.increment();
            connection.close(close_code::PROTOCOL_VIOLATION.into(), b"hello timed out");
            return None;
        }
    };
    if !token_accepted(shared.token_digest.as_ref(), hello.token.as_deref()) {
        tracing::warn!(peer = %connection.remote_address(), "client refused: wrong or missing token");
        shared.stats.connections_refused.increment();
        refuse(
            connection,
            &mut send,
            Refusal::Unauthorized,
            close_code::UNAUTHORIZED,
            "wrong or missing token",
        )
        .await;
        return None;
    }
    let served = match choose(&shared.catalog, &hello) {
        Ok(served) => Arc::clone(served),
        Err((refusal, code)) => {
            let reason = refusal.to_string();
            tracing::warn!(peer = %connection.remote_address(), "client refused: {reason}");
            shared.stats.connections_refused.increment();
            refuse(connection, &mut send, refusal, code, &reason).await;
            return None;
        }
    };
    if send
        .write_chunk(served.accepted_reply.clone())
        .await
        .is_err()
    {
        return None;
    }
    let _ = send.finish();
    Some(served)
}

/// The catalog entry a hello asks for: its model (the first one when it
/// names none) in its dtype; or the refusal and close code when there is none.
fn choose<'a>(
    catalog: &'a [Arc<Served>],
    hello: &Hello,
) -> Result<&'a Arc<Served>, (Refusal, u32)> {
    let name = hello
        .model
        .as_deref()
        .or_else(|| catalog.first().map(|served| served.name.as_str()));
    let of_model: Vec<&Arc<Served>> = catalog
        .iter()
        .filter(|served| Some(served.name.as_str()) == name)
        .collect();
    let Some(first) = of_model.first() else {
        let mut served: Vec<String> = Vec::new();
        for entry in catalog {
            if !served.contains(&entry.name) {
                served.push(entry.name.clone());
            }
        }
        return Err((
            Refusal::UnknownModel {
                requested: name.unwrap_or_default().to_string(),
                served,
            },
            close_code::UNKNOWN_MODEL,
        ));
    };
    of_model
        .iter()
        .find(|served| served.dtype == hello.weight_dtype)
        .copied()
        .ok_or((
            Refusal::DtypeUnavailable {
                requested: hello.weight_dtype,
                served: first.dtype,
            },
            close_code::DTYPE_UNAVAILABLE,
        ))
}

async fn read_hello(recv: &mut quinn::RecvStream) -> Result<Hello, surf_transport::Error> {
    let version = wire::read_handshake_version(recv, "hello").await?;
    if version != PROTOCOL_VERSION {
        return Err(surf_transport::Error::VersionMismatch {
            local: PROTOCOL_VERSION,
            remote: version,
        });
    }
    wire::read_frame(recv, "hello", limits::HELLO).await
}

/// Compares digests of the tokens, which `blake3::Hash` does in constant
/// time, so neither the token's bytes nor its length leak through timing.
fn token_accepted(expected: Option<&blake3::Hash>, presented: Option<&str>) -> bool {
    match (expected, presented) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(expected), Some(presented)) => blake3::hash(presented.as_bytes()) == *expected,
    }
}

async fn refuse(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    refusal: Refusal,
    code: u32,
    reason: &str,
) {
    let reply = HelloReply::Refused(refusal);
    let frame =
        wire::encode_handshake_frame("hello reply", PROTOCOL_VERSION, &reply, limits::HELLO_REPLY);
    send_last_frame(send, frame).await;
    connection.close(code.into(), reason.as_bytes());
}

/// Sends a refusal as the stream's last frame and gives the peer a moment
/// to read it before anything closes.
pub(super) async fn send_last_frame(
    send: &mut quinn::SendStream,
    frame: Result<Vec<u8>, surf_transport::Error>,
) {
    let Ok(frame) = frame else {
        return;
    };
    if send.write_all(&frame).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(REFUSAL_LINGER, send.stopped()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check_needs_the_exact_token_when_one_is_set() {
        let expected = blake3::hash(b"s3cret");
        assert!(token_accepted(Some(&expected), Some("s3cret")));
        assert!(!token_accepted(Some(&expected), Some("s3cret ")));
        assert!(!token_accepted(Some(&expected), Some("")));
        assert!(!token_accepted(Some(&expected), None));
        assert!(token_accepted(None, None));
        assert!(token_accepted(None, Some("anything")));
    }
}
