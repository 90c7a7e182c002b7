//! A weight server on 127.0.0.1 and engines that stream from it, as a
//! remote deployment would, for the streaming and paging benches.

use std::path::Path;
use std::sync::Arc;

use surf_engine::{Engine, Eviction, Gpu, RemoteSource, VramBudget, WeightDtype};
use surf_server::{RunningServer, ServerConfig, WeightServer};
use surf_transport::{ClientConfig, WeightClient};

pub struct Loopback {
    runtime: tokio::runtime::Runtime,
    server: Option<RunningServer>,
    dtype: WeightDtype,
}

/// How an engine built by [`Loopback::engine`] pages its weights.
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    pub budget: VramBudget,
    pub host_cache_bytes: u64,
    pub prefetch: usize,
    pub eviction: Eviction,
}

impl Loopback {
    /// Serves `model_dir` on an ephemeral loopback port. Panics when the
    /// server cannot start: a bench has nothing to measure then.
    pub fn serve(model_dir: &Path) -> Self {
        Self::serve_as(model_dir, WeightDtype::F32)
    }

    /// Serves `model_dir` with its weights as `dtype`; the engines it builds
    /// ask for and hold that dtype.
    pub fn serve_as(model_dir: &Path, dtype: WeightDtype) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the weight server");
        let server = runtime
            .block_on(WeightServer::bind(ServerConfig {
                weight_dtype: dtype.wire(),
                ..ServerConfig::new(model_dir, ([127, 0, 0, 1], 0).into())
            }))
            .expect("the weight server starts");
        Self {
            runtime,
            server: Some(server),
            dtype,
        }
    }

    /// A new engine on `gpu` with its own connection to the server.
    pub fn engine(&self, gpu: &Gpu, paging: Paging) -> Engine {
        let server = self.server.as_ref().expect("the server is running");
        let config = ClientConfig {
            weight_dtype: self.dtype.wire(),
            ..ClientConfig::new(
                vec![server.local_addr()],
                vec![server.certificate_der().clone()],
            )
        };
        let client = self
            .runtime
            .block_on(WeightClient::connect(config))
            .expect("the client connects");
        Engine::builder()
            .source(Arc::new(RemoteSource::new(
                client,
                self.runtime.handle().clone(),
            )))
            .gpu(gpu.clone())
            .vram_budget(paging.budget)
            .host_cache_bytes(paging.host_cache_bytes)
            .prefetch(paging.prefetch)
            .eviction(paging.eviction)
            .weight_dtype(self.dtype)
            .build()
            .expect("the engine starts")
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
    }
}
