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
    #[error("gave up on {object} after {attempts} attempts; last error: {last}")]
    RetriesExhausted {
        object: String,
        attempts: u32,
        last: Box<Error>,
    },
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
    /// True when the error comes from what a user gave (flags, files, token,
    /// names), so that the command line can exit with its bad-input status.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::CertificateFile { .. }
            | Error::NoCertificates { .. }
            | Error::KeyFile { .. }
            | Error::NoTrustedCertificates
            | Error::NoServers
            | Error::Bind { .. }
            | Error::Unauthorized
            | Error::VersionMismatch { .. }
            | Error::DtypeUnavailable { .. }
            | Error::UnknownComponent { .. }
            | Error::UnknownTensor { .. } => true,
            Error::FetchRefused { refusal, .. } => refusal.is_bad_input(),
            Error::NoServerReachable { failures } => {
                !failures.is_empty() && failures.iter().all(|failure| failure.error.is_bad_input())
            }
            Error::RetriesExhausted { last, .. } => last.is_bad_input(),
            _ => false,
        }
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
            | Error::Connect { .. }
            | Error::NoServerReachable { .. }
            | Error::RevisionMismatch { .. }
            | Error::ManifestDtypeMismatch { .. }
            | Error::LengthMismatch { .. }
            | Error::MessageTooLarge { .. }
            | Error::Malformed { .. }
            | Error::NotSurfProtocol { .. } => Recovery::FailOver,
            Error::FetchRefused { refusal, .. } if refusal.is_transient() => Recovery::FailOver,
            _ => Recovery::GiveUp,
        }
    }
}
