//! The model and paging flags that `surf embed` and `surf http` share, and
//! opening an engine from them: a model folder, weight servers, or (with
//! neither) a weight server started in-process with the default model.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use surf_engine::{
    Engine, EngineBuilder, Error as EngineError, Eviction, RemoteSource, VramBudget, WeightDtype,
};
use surf_transport::{CertificateDer, ClientConfig, Timeouts};

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Model folder (config.json, model.safetensors, tokenizer.json, ...).
    #[arg(long, value_name = "DIR", conflicts_with = "server")]
    pub model: Option<PathBuf>,
    /// Weight server to stream layers from (repeatable: fetches are spread over
    /// every server that answers, and one that stops answering is set aside).
    #[arg(long = "server", value_name = "ADDR")]
    pub server: Vec<SocketAddr>,
    /// PEM file of the certificate(s) to trust for --server.
    #[arg(long, value_name = "PEM", requires = "server")]
    pub server_cert: Option<PathBuf>,
    /// Token the weight server asks for.
    #[arg(long, value_name = "T", env = "SURF_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Seconds one layer's fetch may take, retries and failovers included,
    /// before it fails: a weight server that stalls or trickles cannot hang a run.
    #[arg(long, value_name = "SECS", default_value_t = Timeouts::default().fetch.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub fetch_timeout: u64,
    /// GPU memory for weights, in MiB, the pinned embeddings included.
    #[arg(long, value_name = "N", conflicts_with = "cache_layers")]
    pub vram_budget_mb: Option<u64>,
    /// GPU memory for weights, in encoder layers.
    #[arg(long, value_name = "N")]
    pub cache_layers: Option<usize>,
    /// Host memory for layers evicted from the GPU, in MiB.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub host_cache_mb: u64,
    /// Host memory for word-table rows fetched from a weight server, in MiB:
    /// a batch asks for the rows its tokens use that are not held yet.
    #[arg(long, value_name = "N", default_value_t = surf_engine::remote_rows::DEFAULT_ROW_CACHE_BYTES >> 20)]
    pub word_cache_mb: u64,
    /// Layers fetched and uploaded ahead of the one computing.
    #[arg(long, value_name = "D", default_value_t = 2)]
    pub prefetch: usize,
    /// Which layer a full cache gives up: `optimal` (the one used farthest
    /// ahead in the pass order, which keeps most of the budget resident on
    /// repeated passes) or `lru`.
    #[arg(long, value_name = "POLICY", default_value = "optimal")]
    pub eviction: Eviction,
    /// Weights as fetched and as held in GPU memory: `f32`, or `f16`, which
    /// halves the bytes on the wire and in the VRAM budget (the arithmetic
    /// stays f32). Weight servers are asked for this dtype.
    #[arg(long, value_name = "DTYPE", default_value = "f32")]
    pub dtype: WeightDtype,
    /// Largest number of texts per GPU batch.
    #[arg(long, default_value_t = surf_engine::engine::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
}

/// The default model, relative to the working directory.
pub const DEFAULT_MODEL_DIR: &str = "assets/models/all-MiniLM-L6-v2";
const FETCH_SCRIPT: &str = "assets/fetch-model.sh";

/// A weight server started inside this process, on loopback, for the
/// embedded default mode. Dropping it shuts the server down.
pub struct EmbeddedServer {
    runtime: tokio::runtime::Runtime,
    server: Option<crate::RunningServer>,
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
    }
}

/// An engine, and the in-process weight server it streams from, if any.
pub struct OpenedEngine {
    pub engine: Engine,
    /// Held as long as the engine: dropping it stops the server.
    pub embedded_server: Option<EmbeddedServer>,
}

impl EngineArgs {
    fn budget(&self) -> VramBudget {
        match (self.vram_budget_mb, self.cache_layers) {
            (Some(mb), _) => VramBudget::Bytes(mb << 20),
            (None, Some(layers)) => VramBudget::Layers(layers),
            (None, None) => VramBudget::Unbounded,
        }
    }

    /// A builder with the paging flags applied, for the caller to add to.
    pub fn builder(&self) -> EngineBuilder {
        Engine::builder()
            .batch_size(self.batch_size)
            .vram_budget(self.budget())
            .host_cache_bytes(self.host_cache_mb << 20)
            .prefetch(self.prefetch)
            .eviction(self.eviction)
            .weight_dtype(self.dtype)
    }

    /// Opens the engine the flags name, with a progress bar over the layers
    /// as they stream in on a cold start (hidden when stderr is not a
    /// terminal). The bar is the caller's to clear.
    pub fn open_with_progress(&self) -> anyhow::Result<(OpenedEngine, indicatif::ProgressBar)> {
        let progress = indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        progress.set_message("streaming weights");
        let bar = progress.clone();
        let builder = self
            .builder()
            .on_layer_fetched(Arc::new(move |_layer, _bytes| bar.inc(1)));
        let opened = self.open(builder)?;
        progress.set_length(opened.engine.spec().config.num_layers() as u64);
        Ok((opened, progress))
    }

    /// Builds the engine from `builder` over the weight source the flags name.
    pub fn open(&self, builder: EngineBuilder) -> anyhow::Result<OpenedEngine> {
        if let Some(model) = &self.model {
            let engine = builder
                .model_dir(model)
                .build()
                .with_context(|| format!("loading the model from {}", model.display()))?;
            return Ok(OpenedEngine {
                engine,
                embedded_server: None,
            });
        }
        let mut embedded_server = None;
        let (servers, trusted) = if self.server.is_empty() {
            let (server, addr, cert) = start_embedded_server(default_model_dir()?, self.dtype)?;
            embedded_server = Some(server);
            (vec![addr], vec![cert])
        } else {
            let Some(pem) = &self.server_cert else {
                return Err(EngineError::InvalidInput(
                    "--server needs --server-cert PEM, the certificate to trust".into(),
                )
                .into());
            };
            let certs = surf_transport::tls::load_certificates_pem(pem).map_err(|e| {
                EngineError::InputFile {
                    path: pem.clone(),
                    problem: e.to_string(),
                }
            })?;
            (self.server.clone(), certs)
        };
        let mut config = ClientConfig::new(servers.clone(), trusted);
        config.token = self.token.clone();
        config.timeouts.fetch = Duration::from_secs(self.fetch_timeout);
        config.weight_dtype = self.dtype.wire();
        let source = RemoteSource::connect(config)?.with_row_cache_bytes(self.word_cache_mb << 20);
        let engine = builder
            .source(Arc::new(source))
            .build()
            .with_context(|| format!("streaming the model from {servers:?}"))?;
        Ok(OpenedEngine {
            engine,
            embedded_server,
        })
    }
}

/// The default model's folder, relative to the working directory; fetched
/// with `assets/fetch-model.sh` first when it is missing. The Python package
/// streams it when given neither a model folder nor a weight server.
pub fn default_model_dir() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(DEFAULT_MODEL_DIR);
    if !dir.join(surf_engine::engine::WEIGHTS_FILE).is_file() {
        if !std::path::Path::new(FETCH_SCRIPT).is_file() {
            return Err(EngineError::InputFile {
                path: dir,
                problem: format!(
                    "the default model is missing; give --model DIR or --server ADDR, or run from the \
                     repository root so that {FETCH_SCRIPT} can fetch it"
                ),
            }
            .into());
        }
        eprintln!("the default model is missing; fetching it with {FETCH_SCRIPT} ...");
        let status = std::process::Command::new("bash")
            .arg(FETCH_SCRIPT)
            .status()
            .with_context(|| format!("running {FETCH_SCRIPT}"))?;
        if !status.success() {
            anyhow::bail!("{FETCH_SCRIPT} failed ({status})");
        }
    }
    Ok(dir)
}

fn start_embedded_server(
    model_dir: PathBuf,
    dtype: WeightDtype,
) -> anyhow::Result<(EmbeddedServer, SocketAddr, CertificateDer<'static>)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("surf-embedded-server")
        .enable_all()
        .build()
        .context("cannot start the weight server's runtime")?;
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let server = runtime.block_on(crate::WeightServer::bind(crate::ServerConfig {
        weight_dtype: dtype.wire(),
        ..crate::ServerConfig::new(model_dir, listen)
    }))?;
    let addr = server.local_addr();
    let cert = server.certificate_der().clone();
    Ok((
        EmbeddedServer {
            runtime,
            server: Some(server),
        },
        addr,
        cert,
    ))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn fetch_timeout(args: &[&str]) -> Result<u64, clap::Error> {
        Command::try_parse_from(std::iter::once("surf").chain(args.iter().copied()))
            .map(|command| command.engine.fetch_timeout)
    }

    #[test]
    fn the_fetch_timeout_defaults_to_the_clients_and_refuses_zero() {
        assert_eq!(
            fetch_timeout(&[]).ok(),
            Some(Timeouts::default().fetch.as_secs())
        );
        assert_eq!(fetch_timeout(&["--fetch-timeout", "7"]).ok(), Some(7));
        assert!(fetch_timeout(&["--fetch-timeout", "0"]).is_err());
    }
}
