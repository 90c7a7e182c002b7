//! The weight server and the pieces of the `surf` command line.
//!
//! The server owns the model: it memory-maps the safetensors file, groups
//! tensors into components, hashes them into a manifest, and serves them over
//! the `surf-transport` protocol with an LRU cache for components it must
//! assemble, token auth, Prometheus metrics and graceful shutdown. `http` is
//! the embedding service (TEI- and OpenAI-compatible routes over the
//! engine's batching queue).

mod cache;
pub mod cli;
mod error;
pub mod fault;
pub mod http;
pub mod metrics;
mod server;
pub mod store;

pub use error::Error;
pub use fault::Faults;
pub use metrics::StatsSnapshot;
pub use server::{Identity, RunningServer, ServerConfig, WeightServer, self_signed_certificate};
