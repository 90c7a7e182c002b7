//! The QUIC endpoint: handshakes, token checks and fetch streams.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use surf_transport::wire::{
    self, FetchRefusal, FetchReply, FetchRequest, Hello, HelloReply, PROTOCOL_VERSION, Refusal,
    close_code, limits, stream_code,
};
use surf_transport::{Dtype, Manifest, ObjectRef};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::cache::ComponentCache;
use crate::fault::{Faults, SliceAction};
use crate::metrics::{self, Stats, StatsSnapshot};
use crate::origin::{Origin, OriginConfig, UpstreamConfig};
use crate::redis_tier::{Lookup, RedisConfig, RedisTier};

/// How long a new connection has to say hello, and a stream to state its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a refused client to read why before closing on it.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Replies go out in slices of this size, so that a fault hook or a
/// vanished client is noticed between slices.
const REPLY_SLICE: usize = 256 * 1024;

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
    /// the model's configs and tokenizer, or other servers upstream.
    pub origin: OriginConfig,
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
    /// A cache tier shared with other servers, between this server's own
    /// cache and its origin.
    pub redis: Option<RedisConfig>,
    /// Test hooks; see [`crate::fault`].
    pub faults: Faults,
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
            listen,
            cache_bytes: 256 * 1024 * 1024,
            token: None,
            identity: Identity::SelfSigned,
            metrics_listen: None,
            shutdown_grace: Duration::from_secs(10),
            weight_dtype: Dtype::F32,
            redis: None,
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

/// Starts weight servers.
pub struct WeightServer;

impl WeightServer {
    /// Loads and checks the model (or takes the upstream's manifest), binds
    /// the endpoint and starts serving. Must run inside a tokio runtime.
    pub async fn bind(config: ServerConfig) -> Result<RunningServer, Error> {
        let origin = Origin::open(&config.origin, config.weight_dtype).await?;
        let manifest = Arc::new(origin.manifest().clone());
        let weight_dtype = manifest.weight_dtype;
        tracing::info!(
            model = %manifest.model_id,
            revision = %manifest.revision,
            components = manifest.components.len(),
            bytes = manifest.total_bytes(),
            "model loaded"
        );

        let (chain, key, certificate_pem) = match config.identity {
            Identity::SelfSigned => {
                let (certificate, key, pem) = self_signed(config.listen)?;
                (vec![certificate], key, Some(pem))
            }
            Identity::Provided { chain, key } => (chain, key, None),
        };
        let certificate = chain
            .first()
            .cloned()
            .ok_or(surf_transport::Error::NoTrustedCertificates)?;
        let quic_config = surf_transport::tls::server_config(chain, key)?;
        let endpoint = quinn::Endpoint::server(quic_config, config.listen).map_err(|source| {
            Error::Listen {
                addr: config.listen,
                source,
            }
        })?;
        let local_addr = endpoint.local_addr().map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;

        let stats = Arc::new(Stats::default());
        let redis = config
            .redis
            .as_ref()
            .map(|redis| RedisTier::connect(redis, stats.clone()))
            .transpose()?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics_addr = match config.metrics_listen {
            Some(addr) => {
                let listener = metrics::bind_metrics(addr).await?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| Error::MetricsListen { addr, source })?;
                tokio::spawn(metrics::serve_metrics(
                    listener,
                    stats.clone(),
                    cancel.clone(),
                ));
                Some(bound)
            }
            None => None,
        };

        let accepted_reply = Bytes::from(wire::encode_handshake_frame(
            "hello reply",
            PROTOCOL_VERSION,
            &HelloReply::Accepted(Box::new(Manifest::clone(&manifest))),
            limits::HELLO_REPLY,
        )?);
        let shared = Arc::new(Shared {
            cache: ComponentCache::new(config.cache_bytes, stats.clone()),
            origin,
            manifest: manifest.clone(),
            redis,
            stats,
            token_digest: config
                .token
                .as_deref()
                .map(|token| blake3::hash(token.as_bytes())),
            accepted_reply,
            cancel: cancel.clone(),
            tracker: tracker.clone(),
            faults: config.faults,
            weight_dtype,
        });
        let accept_task = tokio::spawn(accept_connections(endpoint.clone(), shared.clone()));
        Ok(RunningServer {
            local_addr,
            metrics_addr,
            certificate,
            certificate_pem,
            manifest,
            shared,
            endpoint,
            cancel,
            tracker,
            accept_task: Some(accept_task),
            shutdown_grace: config.shutdown_grace,
        })
    }
}

/// A server that is accepting connections. Dropping it stops it abruptly;
/// [`RunningServer::shutdown`] lets fetches in flight finish first.
pub struct RunningServer {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    certificate: CertificateDer<'static>,
    certificate_pem: Option<String>,
    manifest: Arc<Manifest>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    cancel: CancellationToken,
    tracker: TaskTracker,
    accept_task: Option<JoinHandle<()>>,
    shutdown_grace: Duration,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The leaf certificate that clients pin.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// The self-signed certificate in PEM, for clients to pin; `None` when
    /// the certificate was provided (clients already have its file).
    pub fn certificate_pem(&self) -> Option<&str> {
        self.certificate_pem.as_deref()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Stops accepting connections and requests, lets the fetches in flight
    /// finish (up to the configured grace period), then closes everything.
    pub async fn shutdown(mut self) {
        self.endpoint.set_server_config(None);
        self.cancel.cancel();
        if let Some(accept_task) = self.accept_task.take() {
            let _ = accept_task.await;
        }
        self.tracker.close();
        if tokio::time::timeout(self.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.shutdown_grace, "fetches still running at the end of the grace period are cut off");
        }
        self.endpoint
            .close(close_code::SHUTTING_DOWN.into(), b"server shutting down");
        self.shared.origin.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// Stops at once, cutting every connection mid-stream, as a crash would.
    pub async fn abort(mut self) {
        self.cancel.cancel();
        self.endpoint
            .close(close_code::SHUTTING_DOWN.into(), b"server stopped");
        if let Some(accept_task) = self.accept_task.take() {
            accept_task.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.endpoint
            .close(close_code::SHUTTING_DOWN.into(), b"server stopped");
    }
}

struct Shared {
    origin: Origin,
    /// The manifest served: the model folder's, or the upstream's unchanged.
    manifest: Arc<Manifest>,
    redis: Option<RedisTier>,
    cache: ComponentCache,
    stats: Arc<Stats>,
    token_digest: Option<blake3::Hash>,
    /// The handshake reply with the manifest, encoded once.
    accepted_reply: Bytes,
    cancel: CancellationToken,
    tracker: TaskTracker,
    faults: Faults,
    weight_dtype: Dtype,
}

/// A fresh self-signed certificate for `localhost` (and `listen`'s address
/// when it is not a wildcard) with its private key.
pub fn self_signed_certificate(
    listen: SocketAddr,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), Error> {
    self_signed(listen).map(|(certificate, key, _pem)| (certificate, key))
}

fn self_signed(
    listen: SocketAddr,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>, String), Error> {
    let mut names = vec!["localhost".to_owned()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    let certified = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    Ok((certified.cert.der().clone(), key, certified.cert.pem()))
}

async fn accept_connections(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            () = shared.cancel.cancelled() => return,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else {
            return;
        };
        let connection_shared = shared.clone();
        shared.tracker.spawn(async move {
            match incoming.await {
                Ok(connection) => serve_connection(connection, connection_shared).await,
                Err(error) => tracing::debug!(%error, "QUIC handshake failed"),
            }
        });
    }
}

/// Decrements the active-connection gauge however the connection ends.
struct ActiveConnection<'a>(&'a Stats);

impl Drop for ActiveConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_active.decrement();
    }
}

async fn serve_connection(connection: quinn::Connection, shared: Arc<Shared>) {
    let peer = connection.remote_address();
    shared.stats.connections.increment();
    shared.stats.connections_active.increment();
    let _active = ActiveConnection(&shared.stats);

    let accepted = tokio::select! {
        () = shared.cancel.cancelled() => false,
        accepted = greet(&connection, &shared) => accepted,
    };
    if !accepted {
        return;
    }
    tracing::debug!(%peer, "client connected");
    loop {
        let stream = tokio::select! {
            () = shared.cancel.cancelled() => return,
            stream = connection.accept_bi() => stream,
        };
        match stream {
            Ok((send, recv)) => {
                let fetch_shared = shared.clone();
                let fetch_connection = connection.clone();
                shared.tracker.spawn(async move {
                    serve_fetch(fetch_connection, send, recv, &fetch_shared).await;
                });
            }
            Err(error) => {
                tracing::debug!(%peer, %error, "client gone");
                return;
            }
        }
    }
}

/// Runs the server side of the handshake; false when the connection was
/// refused (and closed).
async fn greet(connection: &quinn::Connection, shared: &Shared) -> bool {
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, connection.accept_bi()).await;
    let Ok(Ok((mut send, mut recv))) = stream else {
        shared.stats.connections_refused.increment();
        connection.close(close_code::PROTOCOL_VIOLATION.into(), b"no hello");
        return false;
    };
    let hello = tokio::time::timeout(REQUEST_TIMEOUT, read_hello(&mut recv)).await;
    let hello = match hello {
        Ok(Ok(hello)) => hello,
        Ok(Err(error)) => {
            let (refusal, code) = match &error {
                surf_transport::Error::VersionMismatch { remote, .. } => {
                    tracing::warn!(peer = %connection.remote_address(), client_version = remote, "client speaks another protocol version");
                    (
                        Refusal::VersionMismatch {
                            server_version: PROTOCOL_VERSION,
                        },
                        close_code::VERSION_MISMATCH,
                    )
                }
                _ => (
                    Refusal::Malformed {
                        detail: error.to_string(),
                    },
                    close_code::PROTOCOL_VIOLATION,
                ),
            };
            let reason = error.to_string();
            shared.stats.connections_refused.increment();
            refuse(connection, &mut send, refusal, code, &reason).await;
            return false;
        }
        Err(_) => {
            shared.stats.connections_refused.increment();
            connection.close(close_code::PROTOCOL_VIOLATION.into(), b"hello timed out");
            return false;
        }
    };
    if !token_accepted(shared.token_digest.as_ref(), hello.token.as_deref()) {
        tracing::warn!(peer = %connection.remote_address(), "client refused: wrong or missing token");
        shared.stats.connections_refused.increment();
        refuse(
            connection,
            &mut send,
            Refusal::Unauthorized,
            close_code::UNAUTHORIZED,
            "wrong or missing token",
        )
        .await;
        return false;
    }
    if hello.weight_dtype != shared.weight_dtype {
        let refusal = Refusal::DtypeUnavailable {
            requested: hello.weight_dtype,
            served: shared.weight_dtype,
        };
        let reason = refusal.to_string();
        tracing::warn!(peer = %connection.remote_address(), "client refused: {reason}");
        shared.stats.connections_refused.increment();
        refuse(
            connection,
            &mut send,
            refusal,
            close_code::DTYPE_UNAVAILABLE,
            &reason,
        )
        .await;
        return false;
    }
    if send
        .write_chunk(shared.accepted_reply.clone())
        .await
        .is_err()
    {
        return false;
    }
    let _ = send.finish();
    true
}

async fn read_hello(recv: &mut quinn::RecvStream) -> Result<Hello, surf_transport::Error> {
    let version = wire::read_handshake_version(recv, "hello").await?;
    if version != PROTOCOL_VERSION {
        return Err(surf_transport::Error::VersionMismatch {
            local: PROTOCOL_VERSION,
            remote: version,
        });
    }
    wire::read_frame(recv, "hello", limits::HELLO).await
}

/// Compares digests of the tokens, which `blake3::Hash` does in constant
/// time, so neither the token's bytes nor its length leak through timing.
fn token_accepted(expected: Option<&blake3::Hash>, presented: Option<&str>) -> bool {
    match (expected, presented) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(expected), Some(presented)) => blake3::hash(presented.as_bytes()) == *expected,
    }
}

async fn refuse(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    refusal: Refusal,
    code: u32,
    reason: &str,
) {
    let reply = HelloReply::Refused(refusal);
    let frame =
        wire::encode_handshake_frame("hello reply", PROTOCOL_VERSION, &reply, limits::HELLO_REPLY);
    send_last_frame(send, frame).await;
    connection.close(code.into(), reason.as_bytes());
}

/// Sends a refusal as the stream's last frame and gives the peer a moment
/// to read it before anything closes.
async fn send_last_frame(
    send: &mut quinn::SendStream,
    frame: Result<Vec<u8>, surf_transport::Error>,
) {
    let Ok(frame) = frame else {
        return;
    };
    if send.write_all(&frame).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(REFUSAL_LINGER, send.stopped()).await;
    }
}

async fn serve_fetch(
    connection: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Arc<Shared>,
) {
    shared.stats.requests.increment();
    let request = tokio::time::timeout(
        REQUEST_TIMEOUT,
        wire::read_frame::<FetchRequest, _>(&mut recv, "fetch request", limits::FETCH_REQUEST),
    )
    .await;
    let outcome = match request {
        Ok(Ok(request)) => match resolve(shared, &request).await {
            Ok(payload) => send_payload(&connection, &mut send, shared, &request, payload).await,
            Err(refusal) => Err(refusal),
        },
        Ok(Err(surf_transport::Error::MessageTooLarge { len, limit, .. })) => {
            Err(FetchRefusal::RequestTooLarge {
                len,
                limit: limit as u64,
            })
        }
        Ok(Err(surf_transport::Error::Malformed { source, .. })) => Err(FetchRefusal::Malformed {
            detail: source.to_string(),
        }),
        Ok(Err(error)) => {
            shared.stats.request_errors.increment();
            tracing::debug!(%error, "fetch stream ended before its request");
            return;
        }
        Err(_) => {
            shared.stats.request_errors.increment();
            let _ = send.reset(stream_code::CANCELLED.into());
            return;
        }
    };
    let Err(refusal) = outcome else {
        return;
    };
    shared.stats.request_errors.increment();
    tracing::debug!(%refusal, "fetch refused");
    let frame = wire::encode_frame(
        "fetch reply",
        &FetchReply::Refused(refusal),
        limits::FETCH_REPLY,
    );
    send_last_frame(&mut send, frame).await;
}

/// The requested bytes, or why they cannot be served.
async fn resolve(shared: &Arc<Shared>, request: &FetchRequest) -> Result<Bytes, FetchRefusal> {
    let manifest = &shared.manifest;
    let (component_name, object_range) = match &request.object {
        ObjectRef::Component(name) => {
            let component = manifest
                .component(name)
                .ok_or(FetchRefusal::UnknownObject)?;
            (component.name.as_str(), 0..component.byte_len)
        }
        ObjectRef::Tensor(name) => {
            let (component, tensor) = manifest.tensor(name).ok_or(FetchRefusal::UnknownObject)?;
            (component.name.as_str(), tensor.byte_range())
        }
    };
    let object_len = object_range.end - object_range.start;
    if request.start > request.end || request.end > object_len {
        return Err(FetchRefusal::RangeOutOfBounds {
            start: request.start,
            end: request.end,
            len: object_len,
        });
    }
    let component_bytes = component_bytes(shared, component_name).await?;
    let start = (object_range.start + request.start) as usize;
    let end = (object_range.start + request.end) as usize;
    Ok(component_bytes.slice(start..end))
}

/// A component's bytes, looked up in order: the mapped model file, this
/// server's cache, the shared Redis tier, then the origin. Concurrent misses
/// on one component share one load, so the origin sees one fetch.
async fn component_bytes(shared: &Arc<Shared>, name: &str) -> Result<Bytes, FetchRefusal> {
    if let Some(bytes) = shared.origin.mapped_component(name) {
        return Ok(bytes);
    }
    shared
        .cache
        .get_or_load(name, || load_component(shared, name))
        .await
}

/// Bytes that this server's cache does not hold: from Redis when the tier
/// is worth asking, else from the origin, and then written to Redis in the
/// background, without delaying the reply.
async fn load_component(shared: &Arc<Shared>, name: &str) -> Result<Bytes, FetchRefusal> {
    let shared_tier = shared
        .redis
        .as_ref()
        .filter(|_| shared.origin.worth_sharing(name))
        .zip(shared.manifest.component(name));
    if let Some((redis, component)) = shared_tier {
        let (revision, dtype) = (&shared.manifest.revision, shared.manifest.weight_dtype);
        if let Lookup::Hit(bytes) = redis.lookup(revision, dtype, component).await {
            return Ok(bytes);
        }
        let bytes = shared.origin.load(name, &shared.stats).await?;
        redis.store_in_background(revision, dtype, component, bytes.clone());
        return Ok(bytes);
    }
    shared.origin.load(name, &shared.stats).await
}

async fn send_payload(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    shared: &Shared,
    request: &FetchRequest,
    mut payload: Bytes,
) -> Result<(), FetchRefusal> {
    let header = FetchReply::Data {
        len: payload.len() as u64,
    };
    let frame =
        wire::encode_frame("fetch reply", &header, limits::FETCH_REPLY).map_err(|error| {
            FetchRefusal::Internal {
                detail: error.to_string(),
            }
        })?;
    let mut offset = request.start;
    let result: Result<(), quinn::WriteError> = async {
        send.write_all(&frame).await?;
        while !payload.is_empty() {
            let slice = payload.split_to(payload.len().min(REPLY_SLICE));
            let len = slice.len() as u64;
            match shared.faults.apply(&request.object, offset, slice) {
                SliceAction::Send(bytes) => send.write_chunk(bytes).await?,
                SliceAction::SendThenStall(bytes) => {
                    send.write_chunk(bytes).await?;
                    tracing::warn!("fault injection: stalling until the connection closes");
                    connection.closed().await;
                    return Err(quinn::WriteError::ConnectionLost(
                        quinn::ConnectionError::LocallyClosed,
                    ));
                }
            }
            shared.stats.bytes_served.add(len);
            offset += len;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            let _ = send.finish();
            // Until the client has acknowledged the bytes, closing the
            // connection (at shutdown) would lose them.
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, send.stopped()).await;
        }
        Err(error) => {
            shared.stats.request_errors.increment();
            tracing::debug!(object = %request.object, %error, "client went away mid-stream");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check_needs_the_exact_token_when_one_is_set() {
        let expected = blake3::hash(b"s3cret");
        assert!(token_accepted(Some(&expected), Some("s3cret")));
        assert!(!token_accepted(Some(&expected), Some("s3cret ")));
        assert!(!token_accepted(Some(&expected), Some("")));
        assert!(!token_accepted(Some(&expected), None));
        assert!(token_accepted(None, None));
        assert!(token_accepted(None, Some("anything")));
    }
}
