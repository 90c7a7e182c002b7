//! The server side of the handshake: the client's version, token and
//! weight dtype checked before anything is sent, and the manifest or a
//! refusal in reply.

use surf_transport::wire::{
    self, Hello, HelloReply, PROTOCOL_VERSION, Refusal, close_code, limits,
};

use super::{REFUSAL_LINGER, REQUEST_TIMEOUT, Shared};

/// Runs the server side of the handshake; false when the connection was
/// refused (and closed).
pub(super) async fn greet(connection: &quinn::Connection, shared: &Shared) -> bool {
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, connection.accept_bi()).await;
    let Ok(Ok((mut send, mut recv))) = stream else {
        shared.stats.connections_refused.increment();
        connection.close(close_code::PROTOCOL_VIOLATION.into(), b"no hello");
        return false;
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
            return false;
        }
        Err(_) => {
            shared.stats.connections_refused.increment();
            connection.close(close_code::PROTOCOL_VIOLATION.into(), b"hello timed out");
            return false;
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
        return false;
    }
    if hello.weight_dtype != shared.weight_dtype {
        let refusal = Refusal::DtypeUnavailable {
            requested: hello.weight_dtype,
            served: shared.weight_dtype,
        };
        let reason = refusal.to_string();
        tracing::warn!(peer = %connection.remote_address(), "client refused: {reason}");
        shared.stats.connections_refused.increment();
        refuse(
            connection,
            &mut send,
            refusal,
            close_code::DTYPE_UNAVAILABLE,
            &reason,
        )
        .await;
        return false;
    }
    if send
        .write_chunk(shared.accepted_reply.clone())
        .await
        .is_err()
    {
        return false;
    }
    let _ = send.finish();
    true
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
