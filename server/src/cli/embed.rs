//! `surf embed`: texts in, JSON Lines of embeddings out.

use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use surf_engine::{Engine, Error as EngineError, RemoteSource, VramBudget};
use surf_transport::{CertificateDer, ClientConfig};

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Model folder (config.json, model.safetensors, tokenizer.json, ...).
    #[arg(long, value_name = "DIR", conflicts_with = "server")]
    pub model: Option<PathBuf>,
    /// Weight server to stream layers from (repeatable: the next one takes over
    /// when a server stops answering).
    #[arg(long = "server", value_name = "ADDR")]
    pub server: Vec<SocketAddr>,
    /// PEM file of the certificate(s) to trust for --server.
    #[arg(long, value_name = "PEM", requires = "server")]
    pub server_cert: Option<PathBuf>,
    /// Token the weight server asks for.
    #[arg(long, value_name = "T", env = "SURF_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// GPU memory for weights, in MiB, the pinned embeddings included.
    #[arg(long, value_name = "N", conflicts_with = "cache_layers")]
    pub vram_budget_mb: Option<u64>,
    /// GPU memory for weights, in encoder layers.
    #[arg(long, value_name = "N")]
    pub cache_layers: Option<usize>,
    /// Host memory for layers evicted from the GPU, in MiB.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub host_cache_mb: u64,
    /// Layers fetched and uploaded ahead of the one computing.
    #[arg(long, value_name = "D", default_value_t = 2)]
    pub prefetch: usize,
    /// Print inference and cache statistics as one JSON object on stderr.
    #[arg(long)]
    pub stats: bool,
    /// File with one text per line; an empty line is an empty text.
    #[arg(long, value_name = "FILE", conflicts_with = "texts")]
    pub input: Option<PathBuf>,
    /// Texts to embed, when --input is not given.
    pub texts: Vec<String>,
    /// Largest number of texts per GPU batch.
    #[arg(long, default_value_t = surf_engine::engine::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
}

/// The default model, relative to the working directory.
pub const DEFAULT_MODEL_DIR: &str = "assets/models/all-MiniLM-L6-v2";
const FETCH_SCRIPT: &str = "assets/fetch-model.sh";

#[derive(Serialize)]
struct OutputLine<'a> {
    index: usize,
    tokens: usize,
    embedding: &'a [f32],
}

/// Splits a text file into lines, keeping empty lines as empty texts. Invalid
/// UTF-8 is an error that names the line.
pub fn read_lines(path: &std::path::Path) -> Result<Vec<String>, EngineError> {
    let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
        path: path.into(),
        source,
    })?;
    let mut body: &[u8] = &bytes;
    if body.last() == Some(&b'\n') {
        body = &body[..body.len() - 1];
    }
    if body.is_empty() && bytes.is_empty() {
        return Ok(Vec::new());
    }
    body.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            String::from_utf8(line.to_vec()).map_err(|e| EngineError::InputFile {
                path: path.into(),
                problem: format!("line {} is not valid UTF-8 ({e})", i + 1),
            })
        })
        .collect()
}

/// A weight server started inside this process, on loopback, for the
/// embedded default mode.
struct EmbeddedServer {
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

fn default_model_dir() -> anyhow::Result<PathBuf> {
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
) -> anyhow::Result<(EmbeddedServer, SocketAddr, CertificateDer<'static>)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("surf-embedded-server")
        .enable_all()
        .build()
        .context("cannot start the weight server's runtime")?;
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let server = runtime.block_on(crate::WeightServer::bind(crate::ServerConfig::new(
        model_dir, listen,
    )))?;
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

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let texts = match &args.input {
        Some(path) => read_lines(path)?,
        None => args.texts.clone(),
    };
    let budget = match (args.vram_budget_mb, args.cache_layers) {
        (Some(mb), _) => VramBudget::Bytes(mb << 20),
        (None, Some(layers)) => VramBudget::Layers(layers),
        (None, None) => VramBudget::Unbounded,
    };
    // Shown while layers stream in on a cold start; hidden when stderr is not a terminal.
    let progress = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.set_message("streaming weights");
    let bar = progress.clone();
    let builder = Engine::builder()
        .on_layer_fetched(Arc::new(move |_layer, _bytes| bar.inc(1)))
        .batch_size(args.batch_size)
        .vram_budget(budget)
        .host_cache_bytes(args.host_cache_mb << 20)
        .prefetch(args.prefetch);

    // Held until the end: dropping it shuts the in-process server down.
    let mut _embedded = None;
    let engine = if let Some(model) = &args.model {
        builder
            .model_dir(model)
            .build()
            .with_context(|| format!("loading the model from {}", model.display()))?
    } else {
        let (servers, trusted) = if args.server.is_empty() {
            let (server, addr, cert) = start_embedded_server(default_model_dir()?)?;
            _embedded = Some(server);
            (vec![addr], vec![cert])
        } else {
            let Some(pem) = &args.server_cert else {
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
            (args.server.clone(), certs)
        };
        let mut config = ClientConfig::new(servers.clone(), trusted);
        config.token = args.token.clone();
        let source = RemoteSource::connect(config)?;
        builder
            .source(Arc::new(source))
            .build()
            .with_context(|| format!("streaming the model from {servers:?}"))?
    };

    progress.set_length(engine.spec().config.num_hidden_layers as u64);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let embeddings = engine.embed(&refs);
    progress.finish_and_clear();
    let embeddings = embeddings?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for (index, e) in embeddings.iter().enumerate() {
        serde_json::to_writer(
            &mut out,
            &OutputLine {
                index,
                tokens: e.token_ids.len(),
                embedding: &e.vector,
            },
        )?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    if args.stats {
        let report = serde_json::json!({
            "stats": engine.inference_stats()?,
            "cache": engine.cache_info()?,
        });
        eprintln!("{report}");
    }
    Ok(())
}
