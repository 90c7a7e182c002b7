use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::manifest::Dtype;
use crate::wire::{FetchRefusal, Refusal, dtype_fix};

/// Everything that can go wrong on either end of the weight protocol.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read certificates from {path}: {source}")]
    CertificateFile {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificates { path: PathBuf },
    #[error("cannot read the private key from {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("no trusted certificate given: the client needs at least one to pin")]
    NoTrustedCertificates,
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the TLS configuration cannot run QUIC: {0}")]
    QuicCrypto(String),
    #[error("no server address given")]
    NoServers,
    #[error("cannot bind a UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a connection to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(
        "weight server {addr} refused the connection: it serves as many clients as it may (its --max-connections)"
    )]
    ServerBusy { addr: SocketAddr },
    #[error("sending on a stream failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("receiving on a stream failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream I/O failed while {during}: {source}")]
    Io {
        during: &'static str,
        source: std::io::Error,
    },
    #[error("timed out after {timeout:?} while {during}")]
    Timeout {
        during: &'static str,
        timeout: Duration,
    },
    #[error("{kind} message of {len} bytes exceeds its {limit}-byte limit")]
    MessageTooLarge {
        kind: &'static str,
        len: u64,
        limit: usize,
    },
    #[error("malformed {kind} message: {source}")]
    Malformed {
        kind: &'static str,
        source: postcard::Error,
    },
    #[error(
        "the peer does not speak the surf weight protocol (it sent {found:02x?} instead of the magic bytes)"
    )]
    NotSurfProtocol { found: [u8; 4] },
    #[error("protocol version mismatch: this side speaks v{local}, the peer speaks v{remote}")]
    VersionMismatch { local: u32, remote: u32 },
    #[error("the server refused the token (or its absence)")]
    Unauthorized,
    #[error("the server refused the connection: {0}")]
    Refused(Refusal),
    #[error(
        "weight server {addr} serves {served} weights, not {requested} ({})",
        dtype_fix(*requested)
    )]
    DtypeUnavailable {
        addr: SocketAddr,
        requested: Dtype,
        served: Dtype,
    },
    #[error(
        "weight server {addr} accepted a request for {requested} weights but its manifest serves {served}: a protocol violation"
    )]
    ManifestDtypeMismatch {
        addr: SocketAddr,
        requested: Dtype,
        served: Dtype,
    },
    #[error("the server closed the connection: {reason} (code {code})")]
    ClosedByServer { code: u64, reason: String },
    #[error("the server refused to send {object}: {refusal}")]
    FetchRefused {
        object: String,
        refusal: FetchRefusal,
    },
    #[error("the manifest has no component named {name:?}")]
    UnknownComponent { name: String },
    #[error("the manifest has no tensor named {name:?}")]
    UnknownTensor { name: String },
    #[error("the manifest has no row table named {name:?}")]
    UnknownRowTable { name: String },
    #[error("row {row} is outside the {rows} rows of {table}")]
    RowOutOfRange { table: String, row: u32, rows: u64 },
    #[error("the server announced {announced} bytes of {object} where {expected} were asked for")]
    LengthMismatch {
        object: String,
        announced: u64,
        expected: u64,
    },
    #[error("the stream of {object} ended after {received} of {expected} bytes")]
    Truncated {
        object: String,
        received: u64,
        expected: u64,
    },
    #[error(
        "blake3 mismatch in {object} bytes {start}..{end}: the bytes were damaged in flight or at the server"
    )]
    HashMismatch {
        object: String,
        start: u64,
        end: u64,
    },
    #[error("the manifest is inconsistent: {detail}")]
    InvalidManifest { detail: String },
    #[error("the manifest's chunk size of {chunk_size} bytes is outside 1..={max}")]
    ChunkSizeOutOfRange { chunk_size: u64, max: u64 },
    #[error(
        "the manifest's component {component} declares {byte_len} bytes, over the {max}-byte limit"
    )]
    ComponentTooLarge {
        component: String,
        byte_len: u64,
        max: u64,
    },
    #[error(
        "the manifest's component {component} declares {byte_len} bytes but its tensors end at {tensors_end}"
    )]
    ComponentSpanMismatch {
        component: String,
        byte_len: u64,
        tensors_end: u64,
    },
    #[error("{object}: {len} bytes asked for, over the {max}-byte limit of one object")]
    ObjectTooLarge { object: String, len: u64, max: u64 },
    #[error("{object}: the range {start}..{end} ends before it starts")]
    InvertedRange {
        object: String,
        start: u64,
        end: u64,
    },
    #[error("{object}: cannot reserve {len} bytes for it")]
    OutOfMemory { object: String, len: u64 },
    #[error(
        "server {addr} serves revision {found}, but this client started on revision {expected}"
    )]
    RevisionMismatch {
        addr: SocketAddr,
        expected: String,
        found: String,
    },
    #[error("no server could be reached: {}", format_failures(failures))]
    NoServerReachable { failures: Vec<ServerFailure> },
    #[error(
        "fetching {object}{} did not finish within {timeout:?}: {received} of {expected} bytes arrived",
        from_server(server)
    )]
    FetchDeadline {
        object: String,
        /// The server of the attempt that was running, if one was.
        server: Option<SocketAddr>,
        timeout: Duration,
        received: u64,
        expected: u64,
    },
    #[error("gave up on {object} after {attempts} attempts; last error: {last}")]
    RetriesExhausted {
        object: String,
        attempts: u32,
        last: Box<Error>,
    },
}

fn from_server(server: &Option<SocketAddr>) -> String {
    server
        .map(|addr| format!(" from {addr}"))
        .unwrap_or_default()
}

/// What kind of failure an [`Error`] is, for whoever maps failures to exit
/// codes or HTTP statuses: the one place that knows which is which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// What a user gave is wrong: flags, files, names, a dtype no server
    /// serves. Asking again unchanged gives the same answer.
    BadInput,
    /// The server refused the token (or its absence).
    Unauthorized,
    /// No server could give good bytes in time: unreachable, silent,
    /// shutting down, or sending damaged or inconsistent data. Asking again
    /// later may work.
    Unavailable,
    /// A fault on this side: TLS setup, memory.
    Internal,
}

impl ErrorKind {
    fn is_users_to_fix(self) -> bool {
        matches!(self, ErrorKind::BadInput | ErrorKind::Unauthorized)
    }
}

/// Why one server of the list could not be used.
#[derive(Debug)]
pub struct ServerFailure {
    pub addr: SocketAddr,
    pub error: Box<Error>,
}

fn format_failures(failures: &[ServerFailure]) -> String {
    failures
        .iter()
        .map(|failure| format!("{}: {}", failure.addr, failure.error))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a client should do after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// Ask the same server again, from the last good offset.
    RetrySameServer,
    /// The server stopped answering properly: move to the next one.
    FailOver,
    /// Asking again cannot help.
    GiveUp,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::CertificateFile { .. }
            | Error::NoCertificates { .. }
            | Error::KeyFile { .. }
            | Error::NoTrustedCertificates
            | Error::NoServers
            | Error::Bind { .. }
            | Error::VersionMismatch { .. }
            | Error::Refused(Refusal::UnknownModel { .. })
            | Error::DtypeUnavailable { .. }
            | Error::UnknownComponent { .. }
            | Error::UnknownTensor { .. }
            | Error::UnknownRowTable { .. }
            | Error::RowOutOfRange { .. }
            | Error::ObjectTooLarge { .. }
            | Error::InvertedRange { .. } => ErrorKind::BadInput,
            Error::Unauthorized => ErrorKind::Unauthorized,
            Error::Tls(_) | Error::QuicCrypto(_) | Error::OutOfMemory { .. } => ErrorKind::Internal,
            Error::FetchRefused { refusal, .. } if refusal.is_bad_input() => ErrorKind::BadInput,
            // The request this client built was refused as malformed.
            Error::FetchRefused {
                refusal: FetchRefusal::RequestTooLarge { .. } | FetchRefusal::Malformed { .. },
                ..
            } => ErrorKind::Internal,
            Error::NoServerReachable { failures } => {
                let mut kinds = failures.iter().map(|failure| failure.error.kind());
                let first = kinds.next();
                let mut rest = kinds.collect::<Vec<_>>().into_iter();
                match first {
                    Some(first) if rest.all(|kind| kind == first) => first,
                    // Some refused the token, others what else was given.
                    Some(first)
                        if first.is_users_to_fix()
                            && failures
                                .iter()
                                .all(|failure| failure.error.kind().is_users_to_fix()) =>
                    {
                        ErrorKind::BadInput
                    }
                    _ => ErrorKind::Unavailable,
                }
            }
            Error::RetriesExhausted { last, .. } => last.kind(),
            Error::Connect { .. }
            | Error::ConnectTimeout { .. }
            | Error::ServerBusy { .. }
            | Error::Connection(_)
            | Error::Write(_)
            | Error::Read(_)
            | Error::Io { .. }
            | Error::Timeout { .. }
            | Error::MessageTooLarge { .. }
            | Error::Malformed { .. }
            | Error::NotSurfProtocol { .. }
            | Error::Refused(_)
            | Error::ManifestDtypeMismatch { .. }
            | Error::ClosedByServer { .. }
            | Error::FetchRefused { .. }
            | Error::LengthMismatch { .. }
            | Error::Truncated { .. }
            | Error::HashMismatch { .. }
            | Error::InvalidManifest { .. }
            | Error::ChunkSizeOutOfRange { .. }
            | Error::ComponentTooLarge { .. }
            | Error::ComponentSpanMismatch { .. }
            | Error::RevisionMismatch { .. }
            | Error::FetchDeadline { .. } => ErrorKind::Unavailable,
        }
    }

    /// True when the error comes from what a user gave (flags, files, token,
    /// names), so that the command line can exit with its bad-input status.
    pub fn is_bad_input(&self) -> bool {
        self.kind().is_users_to_fix()
    }

    pub(crate) fn recovery(&self) -> Recovery {
        match self {
            Error::HashMismatch { .. } | Error::Truncated { .. } => Recovery::RetrySameServer,
            Error::Connection(_)
            | Error::Write(_)
            | Error::Read(_)
            | Error::Io { .. }
            | Error::Timeout { .. }
            | Error::ClosedByServer { .. }
            | Error::ConnectTimeout { .. }
            | Error::ServerBusy { .. }
            | Error::Connect { .. }
            | Error::NoServerReachable { .. }
            | Error::RevisionMismatch { .. }
            | Error::ManifestDtypeMismatch { .. }
            | Error::LengthMismatch { .. }
            | Error::MessageTooLarge { .. }
            | Error::Malformed { .. }
            | Error::NotSurfProtocol { .. }
            | Error::InvalidManifest { .. }
            | Error::ChunkSizeOutOfRange { .. }
            | Error::ComponentTooLarge { .. }
            | Error::ComponentSpanMismatch { .. } => Recovery::FailOver,
            Error::FetchRefused { refusal, .. } if refusal.is_transient() => Recovery::FailOver,
            _ => Recovery::GiveUp,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn from(port: u16, error: Error) -> ServerFailure {
        ServerFailure {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            error: Box::new(error),
        }
    }

    fn silent(port: u16) -> Error {
        Error::ConnectTimeout {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_refused_token_stays_unauthorized_through_every_wrapper() {
        let everywhere = Error::NoServerReachable {
            failures: vec![from(1, Error::Unauthorized), from(2, Error::Unauthorized)],
        };
        assert_eq!(everywhere.kind(), ErrorKind::Unauthorized);
        let exhausted = Error::RetriesExhausted {
            object: "component pooler".into(),
            attempts: 3,
            last: Box::new(everywhere),
        };
        assert_eq!(exhausted.kind(), ErrorKind::Unauthorized);
        assert!(exhausted.is_bad_input());
    }

    #[test]
    fn servers_failing_in_different_ways_are_unavailable_unless_all_are_the_users_to_fix() {
        let mixed = Error::NoServerReachable {
            failures: vec![from(1, Error::Unauthorized), from(2, silent(2))],
        };
        assert_eq!(mixed.kind(), ErrorKind::Unavailable);
        let users = Error::NoServerReachable {
            failures: vec![
                from(1, Error::Unauthorized),
                from(
                    2,
                    Error::VersionMismatch {
                        local: 2,
                        remote: 3,
                    },
                ),
            ],
        };
        assert_eq!(users.kind(), ErrorKind::BadInput);
        assert_eq!(
            Error::NoServerReachable { failures: vec![] }.kind(),
            ErrorKind::Unavailable
        );
    }

    #[test]
    fn damaged_bytes_and_lies_are_the_servers_not_the_users() {
        let damaged = Error::RetriesExhausted {
            object: "component pooler".into(),
            attempts: 6,
            last: Box::new(Error::HashMismatch {
                object: "component pooler".into(),
                start: 0,
                end: 10,
            }),
        };
        assert_eq!(damaged.kind(), ErrorKind::Unavailable);
        let lie = Error::ComponentTooLarge {
            component: "pooler".into(),
            byte_len: u64::MAX,
            max: 1,
        };
        assert_eq!(lie.kind(), ErrorKind::Unavailable);
        assert_eq!(
            Error::UnknownComponent { name: "x".into() }.kind(),
            ErrorKind::BadInput
        );
    }
}
