//! Opening a connection to one server: QUIC and TLS, then the hello that
//! states the protocol version, token and weight dtype, and the manifest or
//! refusal in reply.

use std::net::SocketAddr;
use std::time::Duration;

use crate::Error;
use crate::manifest::Manifest;
use crate::wire::{self, Hello, HelloReply, PROTOCOL_VERSION, Refusal, close_code, limits};

use super::ClientConfig;

pub(super) async fn within<T>(
    timeout: Duration,
    during: &'static str,
    future: impl Future<Output = T>,
) -> Result<T, Error> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| Error::Timeout { during, timeout })
}

/// Opens a connection to `addr`, states our version and token, and returns
/// the server's manifest.
pub(super) async fn handshake(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    config: &ClientConfig,
) -> Result<(quinn::Connection, Manifest), Error> {
    let server_name = config
        .server_name
        .clone()
        .unwrap_or_else(|| addr.ip().to_string());
    let connecting = endpoint
        .connect(addr, &server_name)
        .map_err(|source| Error::Connect { addr, source })?;
    let connection = tokio::time::timeout(config.timeouts.connect, connecting)
        .await
        .map_err(|_| Error::ConnectTimeout {
            addr,
            timeout: config.timeouts.connect,
        })?
        .map_err(|error| refused_or_failed(addr, error))?;
    let result = within(
        config.timeouts.response,
        "waiting for the manifest",
        exchange_hello(&connection, addr, config),
    )
    .await
    .and_then(|result| result);
    match result {
        Ok(manifest) => Ok((connection, manifest)),
        Err(error) => {
            let error = explain_with_close_reason(&connection, error);
            connection.close(close_code::DONE.into(), b"handshake failed");
            Err(error)
        }
    }
}

async fn exchange_hello(
    connection: &quinn::Connection,
    addr: SocketAddr,
    config: &ClientConfig,
) -> Result<Manifest, Error> {
    let weight_dtype = config.weight_dtype;
    let (mut send, mut recv) = connection.open_bi().await?;
    let hello = Hello {
        token: config.token.clone(),
        weight_dtype,
        model: config.model.clone(),
    };
    let frame = wire::encode_handshake_frame("hello", PROTOCOL_VERSION, &hello, limits::HELLO)?;
    wire::write_frame(&mut send, &frame, "sending hello").await?;
    let _ = send.finish();
    let server_version = wire::read_handshake_version(&mut recv, "hello reply").await?;
    if server_version != PROTOCOL_VERSION {
        return Err(Error::VersionMismatch {
            local: PROTOCOL_VERSION,
            remote: server_version,
        });
    }
    let reply: HelloReply = wire::read_frame(&mut recv, "hello reply", limits::HELLO_REPLY).await?;
    match reply {
        HelloReply::Accepted(manifest) if manifest.weight_dtype != weight_dtype => {
            connection.close(
                close_code::PROTOCOL_VIOLATION.into(),
                b"manifest of another weight dtype than asked for",
            );
            Err(Error::ManifestDtypeMismatch {
                addr,
                requested: weight_dtype,
                served: manifest.weight_dtype,
            })
        }
        HelloReply::Accepted(manifest) => Ok(*manifest),
        HelloReply::Refused(Refusal::DtypeUnavailable { requested, served }) => {
            Err(Error::DtypeUnavailable {
                addr,
                requested,
                served,
            })
        }
        HelloReply::Refused(Refusal::Unauthorized) => Err(Error::Unauthorized),
        HelloReply::Refused(Refusal::VersionMismatch { server_version }) => {
            Err(Error::VersionMismatch {
                local: PROTOCOL_VERSION,
                remote: server_version,
            })
        }
        HelloReply::Refused(refusal) => Err(Error::Refused(refusal)),
    }
}

/// A server at its connection limit refuses new connections outright.
fn refused_or_failed(addr: SocketAddr, error: quinn::ConnectionError) -> Error {
    match &error {
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Error::ServerBusy { addr }
        }
        _ => Error::Connection(error),
    }
}

/// A stream error during the handshake often only means that the server
/// closed the connection; its close code says why.
fn explain_with_close_reason(connection: &quinn::Connection, error: Error) -> Error {
    if !matches!(error, Error::Io { .. } | Error::Connection(_)) {
        return error;
    }
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            let code = close.error_code.into_inner();
            if code == u64::from(close_code::UNAUTHORIZED) {
                Error::Unauthorized
            } else {
                Error::ClosedByServer {
                    code,
                    reason: String::from_utf8_lossy(&close.reason).into_owned(),
                }
            }
        }
        _ => error,
    }
}
