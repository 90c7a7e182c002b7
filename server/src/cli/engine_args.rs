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

/// A model folder on the command line, `DIR` or `NAME=DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelArg {
    /// The name requests use; the folder's name when not given.
    pub name: String,
    pub dir: PathBuf,
}

impl std::str::FromStr for ModelArg {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        // A name holds no path separator, so `a/b=c` stays a folder.
        let (name, dir) = match value.split_once('=') {
            Some((name, dir)) if !name.contains(['/', '\\']) => (Some(name), dir),
            _ => (None, value),
        };
        if name == Some("") || dir.is_empty() {
            return Err(format!("`{value}` is not DIR or NAME=DIR"));
        }
        let dir = PathBuf::from(dir);
        let name = match name {
            Some(name) => name.to_string(),
            None => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| !n.is_empty() && n != "..")
                .ok_or_else(|| format!("`{value}` names no folder; give NAME=DIR"))?,
        };
        Ok(Self { name, dir })
    }
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Model folder (config.json, model.safetensors, tokenizer.json, ...),
    /// as DIR or NAME=DIR; `surf http` takes it repeated, one per model.
    #[arg(long = "model", value_name = "[NAME=]DIR")]
    pub models: Vec<ModelArg>,
    /// Weight server to stream layers from (repeatable: fetches are spread over
    /// every server that answers, and one that stops answering is set aside).
    #[arg(long = "server", value_name = "ADDR")]
    pub server: Vec<SocketAddr>,
    /// PEM file of the certificate(s) to trust for --server.
    #[arg(long, value_name = "PEM", requires = "server")]
    pub server_cert: Option<PathBuf>,
    /// A model of the --server weight servers, by the name they serve it
    /// under; unset, their first. `surf http` takes it repeated.
    #[arg(long, value_name = "NAME", requires = "server")]
    pub serve_model: Vec<String>,
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

    /// The one model folder given, if any; several are refused here, where
    /// one engine is opened.
    pub fn single_model(&self) -> anyhow::Result<Option<&ModelArg>> {
        match self.models.as_slice() {
            [] => Ok(None),
            [model] => {
                if !self.server.is_empty() {
                    return Err(EngineError::InvalidInput(
                        "give --model DIR or --server ADDR, not both".into(),
                    )
                    .into());
                }
                Ok(Some(model))
            }
            _ => Err(EngineError::InvalidInput(
                "only `surf http` serves several models; give one --model".into(),
            )
            .into()),
        }
    }

    /// Builds the engine from `builder` over the weight source the flags name.
    pub fn open(&self, builder: EngineBuilder) -> anyhow::Result<OpenedEngine> {
        if let Some(model) = self.single_model()? {
            let engine = builder
                .model_dir(&model.dir)
                .build()
                .with_context(|| format!("loading the model from {}", model.dir.display()))?;
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
            (self.server.clone(), self.trusted_certs()?)
        };
        let model = match self.serve_model.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            _ => {
                return Err(EngineError::InvalidInput(
                    "only `surf http` serves several models; give one --serve-model".into(),
                )
                .into());
            }
        };
        let source = self.remote_source(servers.clone(), trusted, model)?;
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

impl EngineArgs {
    /// The certificates --server-cert names.
    pub fn trusted_certs(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let Some(pem) = &self.server_cert else {
            return Err(EngineError::InvalidInput(
                "--server needs --server-cert PEM, the certificate to trust".into(),
            )
            .into());
        };
        Ok(
            surf_transport::tls::load_certificates_pem(pem).map_err(|e| {
                EngineError::InputFile {
                    path: pem.clone(),
                    problem: e.to_string(),
                }
            })?,
        )
    }

    /// A weight source streaming `model` (the servers' first when `None`)
    /// from `servers`, with the token, timeout and dtype the flags give.
    pub fn remote_source(
        &self,
        servers: Vec<SocketAddr>,
        trusted: Vec<CertificateDer<'static>>,
        model: Option<String>,
    ) -> anyhow::Result<RemoteSource> {
        let mut config = ClientConfig::new(servers, trusted);
        config.token = self.token.clone();
        config.timeouts.fetch = Duration::from_secs(self.fetch_timeout);
        config.weight_dtype = self.dtype.wire();
        config.model = model;
        Ok(RemoteSource::connect(config)?.with_row_cache_bytes(self.word_cache_mb << 20))
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

    #[test]
    fn a_model_is_a_folder_or_a_named_folder() {
        let plain: ModelArg = "assets/models/all-MiniLM-L6-v2".parse().expect("a folder");
        assert_eq!(plain.name, "all-MiniLM-L6-v2");
        assert_eq!(plain.dir, PathBuf::from("assets/models/all-MiniLM-L6-v2"));
        let named: ModelArg = "mini=assets/models/m".parse().expect("named");
        assert_eq!(named.name, "mini");
        assert_eq!(named.dir, PathBuf::from("assets/models/m"));
        let odd: ModelArg = "models/a=b".parse().expect("a folder with =");
        assert_eq!(odd.dir, PathBuf::from("models/a=b"));
        assert!("=dir".parse::<ModelArg>().is_err());
        assert!("name=".parse::<ModelArg>().is_err());
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
