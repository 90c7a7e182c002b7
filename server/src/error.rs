use std::net::SocketAddr;
use std::path::PathBuf;

use surf_transport::Dtype;

/// Everything that can stop the weight server from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the model folder {path}: {source}")]
    ModelDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is missing: the model folder needs its weights in model.safetensors")]
    MissingWeights { path: PathBuf },
    #[error("cannot open {path}: {source}")]
    WeightsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {source}")]
    Safetensors {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    #[error("{path} is not a BERT checkpoint the server can split into components: {detail}")]
    InvalidModel { path: PathBuf, detail: String },
    #[error("tensor {tensor} in {path} has dtype {dtype}, which the protocol does not carry")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("weights cannot be served as {dtype}: a server serves f32 or f16")]
    UnservableDtype { dtype: Dtype },
    #[error("cannot read {path}: {source}")]
    ModelFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the model's small files exceed {limit} bytes together, more than a manifest may carry"
    )]
    FilesTooLarge { limit: usize },
    #[error("cannot make a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("cannot write the certificate to {path}: {source}")]
    CertificateOut {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for metrics on {addr}: {source}")]
    MetricsListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Transport(#[from] surf_transport::Error),
    #[error("cannot reach the upstream servers {servers:?}: {source}")]
    Upstream {
        servers: Vec<SocketAddr>,
        source: Box<surf_transport::Error>,
    },
    #[error("nothing to serve: give --model DIR, or --upstream ADDR with --upstream-cert PEM")]
    NoOrigin,
    #[error("{0}")]
    Config(String),
    #[error("{url} is not a Redis URL the server can use (redis://HOST:PORT[/DB]): {detail}")]
    RedisUrl { url: String, detail: String },
    #[error("the task loading the model failed: {0}")]
    LoadTask(#[from] tokio::task::JoinError),
}

impl Error {
    /// True when the user can fix the cause: the model folder, the
    /// certificate files, the addresses.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::ModelDir { .. }
            | Error::MissingWeights { .. }
            | Error::WeightsFile { .. }
            | Error::Safetensors { .. }
            | Error::InvalidModel { .. }
            | Error::UnsupportedDtype { .. }
            | Error::UnservableDtype { .. }
            | Error::ModelFile { .. }
            | Error::FilesTooLarge { .. }
            | Error::CertificateOut { .. }
            | Error::Listen { .. }
            | Error::MetricsListen { .. } => true,
            Error::Transport(error) => error.is_bad_input(),
            // A wrong token, certificate or dtype for the upstream is the
            // user's to fix; an upstream that is down is not.
            Error::Upstream { source, .. } => source.is_bad_input(),
            Error::RedisUrl { .. } | Error::NoOrigin | Error::Config(_) => true,
            Error::SelfSigned(_) | Error::LoadTask(_) => false,
        }
    }
}
