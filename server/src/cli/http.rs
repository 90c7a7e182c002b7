//! `surf http`: the embedding service, TEI- and OpenAI-compatible, until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{ArgAction, Args};
use surf_engine::{BatchLimits, Engines, Error as EngineError, Fairness};

use super::engine_args::{EngineArgs, OpenedEngine};
use crate::http::{EmbedService, HttpSettings, ServiceSettings};

#[derive(Debug, Args)]
pub struct HttpArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// TCP address to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// Requests in flight at once; one more is refused with 429.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// Padded tokens per batch (longest input times inputs).
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_batch_tokens: usize,
    /// Inputs per batch; unset, only --max-batch-tokens bounds a batch.
    #[arg(long, value_name = "N")]
    pub max_batch_requests: Option<usize>,
    /// Inputs one request may carry.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub max_client_batch_size: usize,
    /// Largest request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 2_000_000)]
    pub payload_limit: usize,
    /// Cut inputs longer than the model allows when a request does not say
    /// `truncate`; `--auto-truncate false` refuses them with 422.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = ArgAction::Set)]
    pub auto_truncate: bool,
    /// Key clients must send as `Authorization: Bearer <key>`.
    #[arg(long, value_name = "KEY", env = "SURF_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model name to answer with, instead of the model's id (one model).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// The model that requests naming none go to (with several --model);
    /// the first by default.
    #[arg(long, value_name = "NAME")]
    pub default_model: Option<String>,
    /// With several models, how long the oldest request of any model may
    /// wait, in milliseconds, before its model runs next; short of it, the
    /// model whose weights are resident runs first.
    #[arg(long, value_name = "MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_wait_ms: u64,
    /// The model's prompt (config_sentence_transformers.json) put before the
    /// texts of requests that name none: every OpenAI request, and TEI
    /// requests without `prompt_name` (with several models, the default one's).
    #[arg(long, value_name = "NAME")]
    pub default_prompt_name: Option<String>,
}

impl HttpArgs {
    fn settings(&self) -> ServiceSettings {
        ServiceSettings {
            max_concurrent_requests: self.max_concurrent_requests,
            batch: BatchLimits {
                max_batch_tokens: self.max_batch_tokens,
                max_batch_requests: self.max_batch_requests,
            },
            max_client_batch_size: self.max_client_batch_size,
            auto_truncate: self.auto_truncate,
            served_model_name: self
                .served_model_name
                .clone()
                .or_else(|| self.engine.models.first().map(|m| m.name.clone()))
                .or_else(|| self.engine.serve_model.first().cloned()),
            fairness: Fairness::with_max_wait(std::time::Duration::from_millis(self.max_wait_ms)),
            default_prompt_name: self.default_prompt_name.clone(),
        }
    }
}

/// Opens every model of a multi-model service on one device: one VRAM
/// budget and one host cache for all when `--vram-budget-mb` is given.
fn open_models(args: &HttpArgs) -> anyhow::Result<Engines> {
    let engine = &args.engine;
    if engine.cache_layers.is_some() {
        return Err(EngineError::InvalidInput(
            "--cache-layers counts layers of one model; several models of different sizes share --vram-budget-mb".into(),
        )
        .into());
    }
    let mut builder = Engines::builder().host_cache_bytes(engine.host_cache_mb << 20);
    if let Some(mb) = engine.vram_budget_mb {
        builder = builder.vram_budget_bytes(mb << 20);
    }
    if let Some(name) = &args.default_model {
        builder = builder.default_model(name.clone());
    }
    for model in &engine.models {
        builder = builder.model(
            model.name.clone(),
            engine.builder().normalize(false).model_dir(&model.dir),
        );
    }
    if !engine.serve_model.is_empty() {
        let trusted = engine.trusted_certs()?;
        for name in &engine.serve_model {
            let source =
                engine.remote_source(engine.server.clone(), trusted.clone(), Some(name.clone()))?;
            builder = builder.model(
                name.clone(),
                engine.builder().normalize(false).source(Arc::new(source)),
            );
        }
    }
    let mut names: Vec<&str> = engine.models.iter().map(|m| m.name.as_str()).collect();
    names.extend(engine.serve_model.iter().map(String::as_str));
    builder
        .build()
        .with_context(|| format!("loading the models {}", names.join(", ")))
}

pub fn run(args: HttpArgs) -> anyhow::Result<()> {
    // Built before any async runtime exists: the weight client runs one of
    // its own, and the engine thread blocks on it.
    let settings = args.settings();
    let mut _embedded = None;
    let several = args.engine.models.len() + args.engine.serve_model.len() > 1;
    let service = if several {
        let engines = open_models(&args)?;
        Arc::new(EmbedService::start_models(Arc::new(engines), settings)?)
    } else {
        let builder = args.engine.builder().normalize(false);
        let OpenedEngine {
            engine,
            embedded_server,
        } = args.engine.open(builder)?;
        _embedded = embedded_server;
        Arc::new(EmbedService::start(Arc::new(engine), settings)?)
    };
    let http = HttpSettings {
        api_key: args.api_key.clone(),
        payload_limit: args.payload_limit,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("surf-http")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|source| crate::Error::Listen {
                addr: args.listen,
                source,
            })?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        let engines = service.engines();
        for model in 0..engines.len() {
            eprintln!(
                "serving {} ({} dimensions) on {}",
                engines.name(model),
                engines.engine(model).dimension(),
                engines.engine(model).gpu().adapter_name()
            );
        }
        let stop = super::serve::wait_for_stop_signal();
        crate::http::serve(listener, Arc::clone(&service), &http, async {
            if let Err(error) = stop.await {
                tracing::error!(%error, "listening for stop signals failed");
            }
            eprintln!("shutting down: answering the requests already accepted");
        })
        .await
        .context("the HTTP server failed")?;
        anyhow::Ok(())
    })?;
    // Every connection has been answered; the queue is empty.
    service.shutdown();
    Ok(())
}
