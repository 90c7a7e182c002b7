//! The wire protocol between the weight server and the engine: QUIC (quinn over
//! rustls, TLS 1.3), the versioned handshake with its token check, the
//! manifest of a model, ranged and blake3-checked fetches, and
//! [`WeightClient`], which spreads fetches over its servers, retries,
//! resumes and fails over between them.
//!
//! The server side of the protocol lives in `surf-server`; this crate holds
//! everything both sides must agree on.

mod client;
mod error;
pub mod manifest;
mod retry;
mod rotation;
pub mod tls;
pub mod wire;

pub use client::{ClientConfig, RetryPolicy, Timeouts, WeightClient};
pub use error::{Error, ErrorKind, ServerFailure};
pub use manifest::{
    Component, Digest, Dtype, Manifest, ParseDtypeError, TensorEntry, WEIGHTS_FILE,
};
pub use wire::{ObjectRef, PROTOCOL_VERSION};

/// Re-exported so that callers name certificate types without depending on rustls.
pub use rustls::pki_types::{CertificateDer, PrivateKeyDer};
