//! `surf serve`: runs the weight server until SIGINT or SIGTERM.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::engine_args::ModelArg;

use anyhow::Context as _;
use clap::Args;
use surf_transport::tls;

use crate::redis_tier::RedisConfig;
use crate::{
    ConnectionLimits, Error, Identity, OriginConfig, ServerConfig, UpstreamConfig, WeightServer,
};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model folder (model.safetensors, config.json, the tokenizer files), as
    /// DIR or NAME=DIR; repeat it to serve several models, which clients
    /// name in their hello (the first serves clients that name none).
    #[arg(long = "model", value_name = "[NAME=]DIR")]
    pub models: Vec<ModelArg>,
    /// Another weight server to pull components from instead of a model
    /// folder (repeat for failover); its manifest is served unchanged.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with = "models",
        requires = "upstream_cert"
    )]
    pub upstream: Vec<SocketAddr>,
    /// A model of the upstream servers to serve, by its name there (repeat
    /// for several); unset, their first model.
    #[arg(long, value_name = "NAME", requires = "upstream")]
    pub upstream_model: Vec<String>,
    /// Certificate (PEM) of the upstream servers, to pin: their --cert-out.
    #[arg(long, value_name = "PEM", requires = "upstream")]
    pub upstream_cert: Option<PathBuf>,
    /// Token to present to the upstream servers.
    #[arg(
        long,
        value_name = "T",
        requires = "upstream",
        env = "SURF_UPSTREAM_TOKEN",
        hide_env_values = true
    )]
    pub upstream_token: Option<String>,
    /// Redis shared by several servers as a cache tier: redis://HOST:PORT[/DB].
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Put before every key this server writes to Redis.
    #[arg(long, value_name = "P", default_value = "surf", requires = "redis")]
    pub redis_prefix: String,
    /// How long a component stays in Redis, in seconds; 0 keeps it until Redis evicts it.
    #[arg(long, value_name = "SECS", default_value_t = 7 * 24 * 3600, requires = "redis")]
    pub redis_ttl: u64,
    /// UDP address to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Memory budget of the cache of assembled components, in MiB.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub cache_mb: u64,
    /// Token that clients must present before anything is sent to them.
    #[arg(long, value_name = "T", env = "SURF_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Certificate chain (PEM, leaf first) to serve instead of a self-signed one.
    #[arg(
        long,
        value_name = "PEM",
        requires = "key",
        conflicts_with = "cert_out"
    )]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Where to write the self-signed certificate, for clients to pin with --server-cert.
    #[arg(long, value_name = "PEM", required_unless_present = "cert")]
    pub cert_out: Option<PathBuf>,
    /// TCP address for Prometheus metrics at /metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Clients served at once; more are refused at once, so that they try another server.
    #[arg(long, value_name = "N", default_value_t = ConnectionLimits::default().max_connections, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Dtypes the weights are served in, each client getting the one it
    /// asks for (repeat, or give one to offer only it): f16 halves the bytes
    /// on the wire, converted once from the checkpoint and cached.
    #[arg(long, value_name = "f32|f16", default_values_t = [surf_transport::Dtype::F32, surf_transport::Dtype::F16])]
    pub dtype: Vec<surf_transport::Dtype>,
}

/// The models a server serves: the first (its name, where given) and the
/// others by name.
struct Origins {
    first_name: Option<String>,
    first: OriginConfig,
    extra: Vec<(String, OriginConfig)>,
}

fn origins(args: &ServeArgs) -> Result<Origins, Error> {
    if let Some((first, rest)) = args.models.split_first() {
        return Ok(Origins {
            first_name: Some(first.name.clone()),
            first: OriginConfig::Model(first.dir.clone()),
            extra: rest
                .iter()
                .map(|m| (m.name.clone(), OriginConfig::Model(m.dir.clone())))
                .collect(),
        });
    }
    let Some(cert) = &args.upstream_cert else {
        return Err(Error::NoOrigin);
    };
    let upstream = UpstreamConfig {
        servers: args.upstream.clone(),
        trusted_certs: tls::load_certificates_pem(cert).map_err(Error::from)?,
        token: args.upstream_token.clone(),
        model: None,
    };
    let from_upstream = |name: &String| {
        OriginConfig::Upstream(UpstreamConfig {
            model: Some(name.clone()),
            ..upstream.clone()
        })
    };
    Ok(match args.upstream_model.split_first() {
        None => Origins {
            first_name: None,
            first: OriginConfig::Upstream(upstream.clone()),
            extra: Vec::new(),
        },
        Some((first, rest)) => Origins {
            first_name: Some(first.clone()),
            first: from_upstream(first),
            extra: rest
                .iter()
                .map(|name| (name.clone(), from_upstream(name)))
                .collect(),
        },
    })
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Identity::Provided {
            chain: tls::load_certificates_pem(cert).map_err(Error::from)?,
            key: tls::load_private_key_pem(key).map_err(Error::from)?,
        },
        _ => Identity::SelfSigned,
    };
    let Origins {
        first_name: model_name,
        first: origin,
        extra: extra_models,
    } = origins(&args)?;
    let (weight_dtype, extra_dtypes) = match args.dtype.split_first() {
        Some((first, rest)) => (*first, rest.to_vec()),
        None => (surf_transport::Dtype::F32, Vec::new()),
    };
    let redis = args.redis.map(|url| RedisConfig {
        url,
        prefix: args.redis_prefix,
        ttl: (args.redis_ttl > 0).then(|| Duration::from_secs(args.redis_ttl)),
    });
    let config = ServerConfig {
        redis,
        cache_bytes: args.cache_mb.saturating_mul(MIB),
        token: args.token,
        identity,
        metrics_listen: args.metrics_listen,
        model_name,
        extra_models,
        weight_dtype,
        extra_dtypes,
        limits: ConnectionLimits {
            max_connections: args.max_connections,
            ..ConnectionLimits::default()
        },
        ..ServerConfig::serving(origin, args.listen)
    };
    let server = WeightServer::bind(config).await?;
    if let (Some(path), Some(pem)) = (&args.cert_out, server.certificate_pem()) {
        std::fs::write(path, pem).map_err(|source| Error::CertificateOut {
            path: path.clone(),
            source,
        })?;
    }
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {}", server.local_addr())?;
        stdout.flush()?;
    }
    if let Some(metrics_addr) = server.metrics_addr() {
        eprintln!("metrics on http://{metrics_addr}/metrics");
    }
    for (name, manifest) in server.manifests() {
        eprintln!(
            "serving {name}: {} (revision {}, {} components, {} bytes of {} weights)",
            manifest.model_id,
            &manifest.revision[..12.min(manifest.revision.len())],
            manifest.components.len(),
            manifest.total_bytes(),
            manifest.weight_dtype
        );
    }
    wait_for_stop_signal().await?;
    eprintln!("shutting down: letting fetches in flight finish");
    server.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
#[cfg(unix)]
pub async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
pub async fn wait_for_stop_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")
}
