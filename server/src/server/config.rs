//! What a server is told: what to serve, where, as whom and how.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use surf_transport::Dtype;

use crate::fault::Faults;
use crate::origin::{OriginConfig, UpstreamConfig};
use crate::redis_tier::RedisConfig;

/// The server's TLS certificate.
pub enum Identity {
    /// A fresh self-signed certificate for `localhost` and the listen address.
    SelfSigned,
    /// A certificate chain (leaf first) and its private key.
    Provided {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    },
}

/// What to serve and how.
pub struct ServerConfig {
    /// Where the components come from: a folder with `model.safetensors` and
    /// the model's configs and tokenizer, or other servers upstream. This is
    /// the first model, which a client that names none gets.
    pub origin: OriginConfig,
    /// The name clients ask for the first model by; `None`: the folder's
    /// name, or the upstream's model id.
    pub model_name: Option<String>,
    /// Further models served beside the first, by name.
    pub extra_models: Vec<(String, OriginConfig)>,
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Budget of the cache of assembled components, in bytes.
    pub cache_bytes: u64,
    /// When set, connections must present this token before anything is sent.
    pub token: Option<String>,
    pub identity: Identity,
    /// Where to answer `GET /metrics`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a graceful shutdown waits for fetches in flight.
    pub shutdown_grace: Duration,
    /// The dtype float weights are served in: f16 halves the bytes on the
    /// wire, converted once from the checkpoint. A server with an upstream
    /// asks it for this dtype.
    pub weight_dtype: Dtype,
    /// Further dtypes every model is also served in, each converted once and
    /// cached apart: a client gets the one it asks for.
    pub extra_dtypes: Vec<Dtype>,
    /// A cache tier shared with other servers, between this server's own
    /// cache and its origin.
    pub redis: Option<RedisConfig>,
    pub limits: ConnectionLimits,
    /// Test hooks; see [`crate::fault`].
    pub faults: Faults,
}

/// How much one server takes on at once. Clients past a limit are refused
/// at once (a QUIC connection refusal), not queued, so that they move on
/// to another server instead of waiting for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once, handshakes included.
    pub max_connections: u32,
    /// Connections in their handshake (QUIC, TLS, hello) at once: the part
    /// that costs the server work before the client has shown its token.
    pub max_handshakes: u32,
    /// Fetch streams one connection may have open at once.
    pub max_streams_per_connection: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 256,
            max_handshakes: 64,
            max_streams_per_connection: 256,
        }
    }
}

impl ServerConfig {
    /// Serves the model in `model_dir`.
    pub fn new(model_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self::serving(OriginConfig::Model(model_dir.into()), listen)
    }

    /// Serves what `upstream` serves, pulled through on demand.
    pub fn regional(upstream: UpstreamConfig, listen: SocketAddr) -> Self {
        Self::serving(OriginConfig::Upstream(upstream), listen)
    }

    /// Serves what `origin` holds, with the defaults for everything else.
    pub fn serving(origin: OriginConfig, listen: SocketAddr) -> Self {
        ServerConfig {
            origin,
            model_name: None,
            extra_models: Vec::new(),
            listen,
            cache_bytes: 256 * 1024 * 1024,
            token: None,
            identity: Identity::SelfSigned,
            metrics_listen: None,
            shutdown_grace: Duration::from_secs(10),
            weight_dtype: Dtype::F32,
            extra_dtypes: Vec::new(),
            redis: None,
            limits: ConnectionLimits::default(),
            faults: Faults::default(),
        }
    }

    /// Makes the server commit the faults in `plan` (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn with_faults(mut self, plan: crate::fault::FaultPlan) -> Self {
        self.faults.plan = Some(plan);
        self
    }
}
