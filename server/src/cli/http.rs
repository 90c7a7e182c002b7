//! `surf http`: the embedding service, TEI- and OpenAI-compatible, until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{ArgAction, Args};
use surf_engine::BatchLimits;

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
    /// Model name to answer with, instead of the model's id.
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// The model's prompt (config_sentence_transformers.json) put before the
    /// texts of requests that name none: every OpenAI request, and TEI
    /// requests without `prompt_name`.
    #[arg(long, value_name = "NAME")]
    pub default_prompt_name: Option<String>,
}

pub fn run(args: HttpArgs) -> anyhow::Result<()> {
    // Built before any async runtime exists: the weight client runs one of
    // its own, and the engine thread blocks on it.
    let builder = args.engine.builder().normalize(false);
    let OpenedEngine {
        engine,
        embedded_server: _embedded,
    } = args.engine.open(builder)?;
    let settings = ServiceSettings {
        max_concurrent_requests: args.max_concurrent_requests,
        batch: BatchLimits {
            max_batch_tokens: args.max_batch_tokens,
            max_batch_requests: args.max_batch_requests,
        },
        max_client_batch_size: args.max_client_batch_size,
        auto_truncate: args.auto_truncate,
        served_model_name: args.served_model_name.clone(),
        default_prompt_name: args.default_prompt_name.clone(),
    };
    let service = Arc::new(EmbedService::start(Arc::new(engine), settings)?);
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
        eprintln!(
            "serving {} ({} dimensions) on {}",
            service.model_name(),
            service.engine().dimension(),
            service.engine().gpu().adapter_name()
        );
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
