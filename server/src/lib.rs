//! The weight server and the pieces of the `surf` command line.
//!
//! The server owns the model: it memory-maps the safetensors file, groups
//! tensors into components, hashes them into a manifest, and serves them over
//! the `surf-transport` protocol with an LRU cache for components it must
//! assemble, token auth, Prometheus metrics and graceful shutdown. A regional
//! server holds no model: it pulls components from an origin server
//! upstream (`origin`), and servers share what they pulled through a Redis
//! tier (`redis_tier`). `http` is
//! the embedding service (TEI- and OpenAI-compatible routes over the
//! engine's batching queue).

mod cache;
pub mod cli;
mod error;
pub mod fault;
pub mod http;
pub mod metrics;
pub mod origin;
pub mod redis_tier;
mod server;
pub mod store;

pub use error::Error;
pub use fault::Faults;
pub use metrics::StatsSnapshot;
pub use origin::{OriginConfig, UpstreamConfig};
pub use server::{
    ConnectionLimits, Identity, RunningServer, ServerConfig, WeightServer, self_signed_certificate,
};
