//! `WeightClient`: fetches verified weight bytes from a list of servers.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tokio::sync::Mutex;

use crate::error::{Recovery, ServerFailure};
use crate::manifest::{Digest, Dtype, MAX_COMPONENT_BYTES, Manifest};
use crate::rotation::Rotation;
use crate::wire::{
    self, FetchReply, FetchRequest, Hello, HelloReply, ObjectRef, PROTOCOL_VERSION, Refusal,
    close_code, limits,
};
use crate::{Error, tls};

/// How long to wait for the server before calling it unresponsive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The QUIC and TLS handshake with one server.
    pub connect: Duration,
    /// Any single step after that: the manifest, a fetch reply, the next
    /// bytes of a fetch. A server that stays silent this long is failed over.
    pub response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(10),
        }
    }
}

/// How often, and how patiently, a fetch is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Failed attempts in a row (without new verified bytes) before giving up.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The pause after the `failures`-th failure in a row: doubling from
    /// `initial_backoff`, capped at `max_backoff`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

/// Where to fetch from and whom to trust.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Servers that hold the same model. Fetches take them in turn, so that
    /// load spreads over every one that answers; a server that fails is set
    /// aside for a while and its fetches go to the others.
    pub servers: Vec<SocketAddr>,
    /// Certificates to pin, or roots for the servers' chains.
    pub trusted_certs: Vec<CertificateDer<'static>>,
    /// Name to verify against when a server's certificate is not pinned;
    /// `None` verifies the IP address dialled.
    pub server_name: Option<String>,
    pub token: Option<String>,
    /// The dtype to ask for float weights in ([`Dtype::F32`] or
    /// [`Dtype::F16`]). A server that serves another refuses and the client
    /// moves on to the next one; when none serves it, connecting fails with
    /// [`Error::DtypeUnavailable`].
    pub weight_dtype: Dtype,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
}

impl ClientConfig {
    pub fn new(servers: Vec<SocketAddr>, trusted_certs: Vec<CertificateDer<'static>>) -> Self {
        ClientConfig {
            servers,
            trusted_certs,
            server_name: None,
            token: None,
            weight_dtype: Dtype::F32,
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
        }
    }
}

/// A connection to the weight servers. Cloning is cheap and clones share the
/// connection, so fetches from many tasks run at once on one QUIC connection.
#[derive(Clone)]
pub struct WeightClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    manifest: Manifest,
    servers: Mutex<Servers>,
}

/// The connections to the servers, and whose turn it is.
struct Servers {
    /// One per server of the list, made when its turn first comes.
    links: Vec<Option<Link>>,
    rotation: Rotation,
    /// The server of the link handed out last.
    last_used: Option<usize>,
    links_made: u64,
}

#[derive(Clone)]
struct Link {
    connection: quinn::Connection,
    server: usize,
    id: u64,
}

/// The hashes that the bytes of one fetched object must match.
struct Verification {
    /// `(end offset, digest)` of consecutive segments covering the object.
    segments: Vec<(u64, Digest)>,
    whole: Option<Digest>,
}

impl WeightClient {
    /// Connects to the first server of the list that answers and takes its
    /// manifest.
    pub async fn connect(config: ClientConfig) -> Result<Self, Error> {
        if config.servers.is_empty() {
            return Err(Error::NoServers);
        }
        let quic_config = tls::client_config(&config.trusted_certs)?;
        let bind_addr: SocketAddr = if config.servers.iter().all(SocketAddr::is_ipv4) {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind_addr).map_err(|source| Error::Bind {
            addr: bind_addr,
            source,
        })?;
        endpoint.set_default_client_config(quic_config);

        let mut failures = Vec::new();
        for (index, &addr) in config.servers.iter().enumerate() {
            match handshake(&endpoint, addr, &config).await {
                Ok((connection, manifest)) => {
                    manifest.validate()?;
                    let mut links = vec![None; config.servers.len()];
                    links[index] = Some(Link {
                        connection,
                        server: index,
                        id: 0,
                    });
                    let mut rotation = Rotation::new(config.servers.len());
                    rotation.start_at(index);
                    // Every server before this one failed to connect.
                    for failed in 0..index {
                        rotation.failed(failed, Instant::now());
                    }
                    let servers = Servers {
                        links,
                        rotation,
                        last_used: Some(index),
                        links_made: 1,
                    };
                    return Ok(WeightClient {
                        inner: Arc::new(ClientInner {
                            config,
                            endpoint,
                            manifest,
                            servers: Mutex::new(servers),
                        }),
                    });
                }
                Err(error) => {
                    tracing::warn!(%addr, %error, "weight server unavailable");
                    failures.push(ServerFailure {
                        addr,
                        error: Box::new(error),
                    });
                }
            }
        }
        Err(collapse_failures(failures))
    }

    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// The server of the last fetch attempt, if its connection is open.
    pub async fn current_server(&self) -> Option<SocketAddr> {
        let servers = self.inner.servers.lock().await;
        let index = servers.last_used?;
        servers.links[index]
            .as_ref()
            .filter(|link| link.connection.close_reason().is_none())
            .map(|_| self.inner.config.servers[index])
    }

    /// Fetches all bytes of a component, checked against the manifest's
    /// hashes; damaged bytes are fetched again, never returned.
    pub async fn fetch_component(&self, name: &str) -> Result<Bytes, Error> {
        let component =
            self.inner
                .manifest
                .component(name)
                .ok_or_else(|| Error::UnknownComponent {
                    name: name.to_owned(),
                })?;
        let verification = Verification {
            segments: self.inner.manifest.chunk_ends(component),
            whole: Some(component.hash),
        };
        self.fetch_verified(
            ObjectRef::Component(component.name.clone()),
            component.byte_len,
            &verification,
        )
        .await
    }

    /// Fetches one tensor (by its prefix-free name), checked against its hash.
    pub async fn fetch_tensor(&self, name: &str) -> Result<Bytes, Error> {
        let (_, tensor) = self
            .inner
            .manifest
            .tensor(name)
            .ok_or_else(|| Error::UnknownTensor {
                name: name.to_owned(),
            })?;
        let verification = Verification {
            segments: vec![(tensor.byte_len, tensor.hash)],
            whole: None,
        };
        self.fetch_verified(
            ObjectRef::Tensor(tensor.name.clone()),
            tensor.byte_len,
            &verification,
        )
        .await
    }

    /// Fetches a byte range of an object once, from the current server,
    /// without hash checks or retries: for tools that inspect a server.
    pub async fn fetch_unverified_range(
        &self,
        object: ObjectRef,
        range: Range<u64>,
    ) -> Result<Bytes, Error> {
        let link = self.link().await?;
        let mut assembly = Assembly::new(object.to_string(), range.start, range.end, None)?;
        self.fetch_once(&link, &object, &mut assembly).await?;
        Ok(Bytes::from(assembly.data))
    }

    /// Closes the connections politely and waits for the servers to hear it.
    pub async fn close(&self) {
        let mut servers = self.inner.servers.lock().await;
        for link in servers.links.iter_mut().filter_map(Option::take) {
            link.connection.close(close_code::DONE.into(), b"done");
        }
        drop(servers);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }

    async fn fetch_verified(
        &self,
        object: ObjectRef,
        byte_len: u64,
        verification: &Verification,
    ) -> Result<Bytes, Error> {
        let retry = self.inner.config.retry;
        let mut assembly = Assembly::new(object.to_string(), 0, byte_len, Some(verification))?;
        let mut failures_in_a_row = 0u32;
        loop {
            let verified_before = assembly.verified;
            let attempt = match self.link().await {
                Ok(link) => self
                    .fetch_once(&link, &object, &mut assembly)
                    .await
                    .and_then(|()| assembly.check_whole())
                    .map_err(|error| (Some(link), error)),
                Err(error) => Err((None, error)),
            };
            let (link, error) = match attempt {
                Ok(()) => return Ok(Bytes::from(std::mem::take(&mut assembly.data))),
                Err(failure) => failure,
            };
            let recovery = error.recovery();
            tracing::debug!(%object, %error, ?recovery, resume_at = assembly.received(), "fetch attempt failed");
            if recovery == Recovery::GiveUp {
                return Err(error);
            }
            if let (Recovery::FailOver, Some(link)) = (recovery, link) {
                self.abandon(&link).await;
            }
            if assembly.verified > verified_before {
                failures_in_a_row = 0;
            }
            failures_in_a_row += 1;
            if failures_in_a_row >= retry.max_attempts {
                return Err(Error::RetriesExhausted {
                    object: object.to_string(),
                    attempts: failures_in_a_row,
                    last: Box::new(error),
                });
            }
            tokio::time::sleep(retry.backoff(failures_in_a_row)).await;
        }
    }

    /// One request for the rest of `assembly`, on one stream.
    async fn fetch_once(
        &self,
        link: &Link,
        object: &ObjectRef,
        assembly: &mut Assembly<'_>,
    ) -> Result<(), Error> {
        let response_timeout = self.inner.config.timeouts.response;
        let start = assembly.next_offset();
        let end = assembly.end;
        let (mut send, mut recv) = link.connection.open_bi().await?;
        let request = FetchRequest {
            object: object.clone(),
            start,
            end,
        };
        let frame = wire::encode_frame("fetch request", &request, limits::FETCH_REQUEST)?;
        wire::write_frame(&mut send, &frame, "sending a fetch request").await?;
        // The request is complete; a finished send side also tells the server
        // that nothing else will arrive on this stream.
        let _ = send.finish();

        let reply: FetchReply = within(
            response_timeout,
            "waiting for a fetch reply",
            wire::read_frame(&mut recv, "fetch reply", limits::FETCH_REPLY),
        )
        .await??;
        match reply {
            FetchReply::Data { len } if len == end - start => {}
            FetchReply::Data { len } => {
                return Err(Error::LengthMismatch {
                    object: object.to_string(),
                    announced: len,
                    expected: end - start,
                });
            }
            FetchReply::Refused(refusal) => {
                return Err(Error::FetchRefused {
                    object: object.to_string(),
                    refusal,
                });
            }
        }

        while let Some(chunk) = within(
            response_timeout,
            "waiting for weight bytes",
            recv.read_chunk(usize::MAX, true),
        )
        .await??
        {
            assembly.push(&chunk.bytes)?;
        }
        if assembly.next_offset() != end {
            return Err(Error::Truncated {
                object: object.to_string(),
                received: assembly.next_offset() - assembly.start,
                expected: end - assembly.start,
            });
        }
        Ok(())
    }

    /// The connection to the server whose turn it is, made if needed; a
    /// server that cannot be reached is set aside and the next one asked.
    async fn link(&self) -> Result<Link, Error> {
        let mut servers = self.inner.servers.lock().await;
        let order = servers.rotation.order(Instant::now());
        let addrs = &self.inner.config.servers;
        let mut failures = Vec::new();
        for index in order {
            if let Some(link) = &servers.links[index] {
                if link.connection.close_reason().is_none() {
                    let link = link.clone();
                    servers.last_used = Some(index);
                    return Ok(link);
                }
                servers.links[index] = None;
            }
            let addr = addrs[index];
            let outcome = handshake(&self.inner.endpoint, addr, &self.inner.config)
                .await
                .and_then(|(connection, manifest)| {
                    if manifest.revision == self.inner.manifest.revision {
                        Ok(connection)
                    } else {
                        connection.close(close_code::DONE.into(), b"revision mismatch");
                        Err(Error::RevisionMismatch {
                            addr,
                            expected: self.inner.manifest.revision.clone(),
                            found: manifest.revision,
                        })
                    }
                });
            match outcome {
                Ok(connection) => {
                    tracing::info!(%addr, "connected to weight server");
                    let link = Link {
                        connection,
                        server: index,
                        id: servers.links_made,
                    };
                    servers.links_made += 1;
                    servers.links[index] = Some(link.clone());
                    servers.rotation.succeeded(index);
                    servers.last_used = Some(index);
                    return Ok(link);
                }
                Err(error) => {
                    tracing::warn!(%addr, %error, "weight server unavailable");
                    servers.rotation.failed(index, Instant::now());
                    failures.push(ServerFailure {
                        addr,
                        error: Box::new(error),
                    });
                }
            }
        }
        // Servers that all answer that they serve another dtype are no
        // passing outage: the dtype error itself ends the fetch.
        if all_dtype_unavailable(&failures) {
            return Err(*failures.swap_remove(0).error);
        }
        Err(Error::NoServerReachable { failures })
    }

    /// Drops a link that misbehaved (unless another task already replaced
    /// it) and sets its server aside, so that the next attempts go to the
    /// others.
    async fn abandon(&self, link: &Link) {
        let mut servers = self.inner.servers.lock().await;
        let live = &mut servers.links[link.server];
        if live.as_ref().is_some_and(|live| live.id == link.id) {
            *live = None;
            servers.rotation.failed(link.server, Instant::now());
        }
        link.connection
            .close(close_code::UNRESPONSIVE.into(), b"failing over");
    }
}

/// The error of a connect that no server of the list accepted: the one
/// failure itself when there was one, the first dtype refusal when every
/// server answered that it serves another weight dtype, the whole list
/// otherwise.
fn collapse_failures(mut failures: Vec<ServerFailure>) -> Error {
    if failures.len() == 1 || all_dtype_unavailable(&failures) {
        return *failures.swap_remove(0).error;
    }
    Error::NoServerReachable { failures }
}

fn all_dtype_unavailable(failures: &[ServerFailure]) -> bool {
    !failures.is_empty()
        && failures
            .iter()
            .all(|failure| matches!(*failure.error, Error::DtypeUnavailable { .. }))
}

async fn within<T>(
    timeout: Duration,
    during: &'static str,
    future: impl Future<Output = T>,
) -> Result<T, Error> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| Error::Timeout { during, timeout })
}

/// Opens a connection to `addr`, states our version and token, and returns
/// the server's manifest.
async fn handshake(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    config: &ClientConfig,
) -> Result<(quinn::Connection, Manifest), Error> {
    let server_name = config
        .server_name
        .clone()
        .unwrap_or_else(|| addr.ip().to_string());
    let connecting = endpoint
        .connect(addr, &server_name)
        .map_err(|source| Error::Connect { addr, source })?;
    let connection = tokio::time::timeout(config.timeouts.connect, connecting)
        .await
        .map_err(|_| Error::ConnectTimeout {
            addr,
            timeout: config.timeouts.connect,
        })??;
    let result = within(
        config.timeouts.response,
        "waiting for the manifest",
        exchange_hello(&connection, addr, config.token.clone(), config.weight_dtype),
    )
    .await
    .and_then(|result| result);
    match result {
        Ok(manifest) => Ok((connection, manifest)),
        Err(error) => {
            let error = explain_with_close_reason(&connection, error);
            connection.close(close_code::DONE.into(), b"handshake failed");
            Err(error)
        }
    }
}

async fn exchange_hello(
    connection: &quinn::Connection,
    addr: SocketAddr,
    token: Option<String>,
    weight_dtype: Dtype,
) -> Result<Manifest, Error> {
    let (mut send, mut recv) = connection.open_bi().await?;
    let hello = Hello {
        token,
        weight_dtype,
    };
    let frame = wire::encode_handshake_frame("hello", PROTOCOL_VERSION, &hello, limits::HELLO)?;
    wire::write_frame(&mut send, &frame, "sending hello").await?;
    let _ = send.finish();
    let server_version = wire::read_handshake_version(&mut recv, "hello reply").await?;
    if server_version != PROTOCOL_VERSION {
        return Err(Error::VersionMismatch {
            local: PROTOCOL_VERSION,
            remote: server_version,
        });
    }
    let reply: HelloReply = wire::read_frame(&mut recv, "hello reply", limits::HELLO_REPLY).await?;
    match reply {
        HelloReply::Accepted(manifest) if manifest.weight_dtype != weight_dtype => {
            connection.close(
                close_code::PROTOCOL_VIOLATION.into(),
                b"manifest of another weight dtype than asked for",
            );
            Err(Error::ManifestDtypeMismatch {
                addr,
                requested: weight_dtype,
                served: manifest.weight_dtype,
            })
        }
        HelloReply::Accepted(manifest) => Ok(*manifest),
        HelloReply::Refused(Refusal::DtypeUnavailable { requested, served }) => {
            Err(Error::DtypeUnavailable {
                addr,
                requested,
                served,
            })
        }
        HelloReply::Refused(Refusal::Unauthorized) => Err(Error::Unauthorized),
        HelloReply::Refused(Refusal::VersionMismatch { server_version }) => {
            Err(Error::VersionMismatch {
                local: PROTOCOL_VERSION,
                remote: server_version,
            })
        }
        HelloReply::Refused(refusal) => Err(Error::Refused(refusal)),
    }
}

/// A stream error during the handshake often only means that the server
/// closed the connection; its close code says why.
fn explain_with_close_reason(connection: &quinn::Connection, error: Error) -> Error {
    if !matches!(error, Error::Io { .. } | Error::Connection(_)) {
        return error;
    }
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            let code = close.error_code.into_inner();
            if code == u64::from(close_code::UNAUTHORIZED) {
                Error::Unauthorized
            } else {
                Error::ClosedByServer {
                    code,
                    reason: String::from_utf8_lossy(&close.reason).into_owned(),
                }
            }
        }
        _ => error,
    }
}

/// Bytes of one object as they arrive, checked segment by segment.
struct Assembly<'v> {
    object: String,
    /// Offset in the object of `data[0]`.
    start: u64,
    end: u64,
    data: Vec<u8>,
    verification: Option<&'v Verification>,
    next_segment: usize,
    /// Offset up to which every segment matched its hash.
    verified: u64,
    whole: blake3::Hasher,
}

impl<'v> Assembly<'v> {
    /// Reserves room for `start..end` up front, once its length is known to
    /// be within [`MAX_COMPONENT_BYTES`], and as an error rather than an
    /// abort when the memory is not there.
    fn new(
        object: String,
        start: u64,
        end: u64,
        verification: Option<&'v Verification>,
    ) -> Result<Self, Error> {
        let Some(len) = end.checked_sub(start) else {
            return Err(Error::InvertedRange { object, start, end });
        };
        if len > MAX_COMPONENT_BYTES {
            return Err(Error::ObjectTooLarge {
                object,
                len,
                max: MAX_COMPONENT_BYTES,
            });
        }
        let mut data = Vec::new();
        let reserved = usize::try_from(len)
            .ok()
            .and_then(|len| data.try_reserve_exact(len).ok());
        if reserved.is_none() {
            return Err(Error::OutOfMemory { object, len });
        }
        Ok(Assembly {
            object,
            start,
            end,
            data,
            verification,
            next_segment: 0,
            verified: start,
            whole: blake3::Hasher::new(),
        })
    }

    fn next_offset(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    fn received(&self) -> u64 {
        self.data.len() as u64
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if self.next_offset() + bytes.len() as u64 > self.end {
            return Err(Error::LengthMismatch {
                object: self.object.clone(),
                announced: self.next_offset() + bytes.len() as u64 - self.start,
                expected: self.end - self.start,
            });
        }
        self.data.extend_from_slice(bytes);
        self.verify_complete_segments()
    }

    fn verify_complete_segments(&mut self) -> Result<(), Error> {
        let Some(verification) = self.verification else {
            return Ok(());
        };
        while let Some(&(segment_end, digest)) = verification.segments.get(self.next_segment) {
            if segment_end > self.next_offset() {
                break;
            }
            let segment = &self.data[self.index(self.verified)..self.index(segment_end)];
            let hash = blake3::hash(segment);
            if !digest.matches(&hash) {
                let start = self.verified;
                let keep = self.index(self.verified);
                self.data.truncate(keep);
                return Err(Error::HashMismatch {
                    object: self.object.clone(),
                    start,
                    end: segment_end,
                });
            }
            if verification.whole.is_some() {
                self.whole.update(segment);
            }
            self.verified = segment_end;
            self.next_segment += 1;
        }
        Ok(())
    }

    fn index(&self, offset: u64) -> usize {
        (offset - self.start) as usize
    }

    /// After every segment matched, checks the digest of the whole object;
    /// on a mismatch (a manifest whose chunk hashes disagree with its
    /// component hash) everything is fetched again.
    fn check_whole(&mut self) -> Result<(), Error> {
        let Some(Verification {
            whole: Some(digest),
            ..
        }) = self.verification
        else {
            return Ok(());
        };
        if digest.matches(&self.whole.finalize()) {
            return Ok(());
        }
        let end = self.end;
        self.data.clear();
        self.verified = self.start;
        self.next_segment = 0;
        self.whole.reset();
        Err(Error::HashMismatch {
            object: self.object.clone(),
            start: self.start,
            end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verification_of(bytes: &[u8], chunk: usize) -> Verification {
        let mut end = 0u64;
        let segments = bytes
            .chunks(chunk)
            .map(|piece| {
                end += piece.len() as u64;
                (end, Digest::of(piece))
            })
            .collect();
        Verification {
            segments,
            whole: Some(Digest::of(bytes)),
        }
    }

    #[test]
    fn damaged_chunk_is_dropped_back_to_the_last_good_offset() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let verification = verification_of(&bytes, 32);
        let mut assembly =
            Assembly::new("x".into(), 0, 100, Some(&verification)).expect("a small object");
        assembly.push(&bytes[..40]).expect("first chunk is intact");
        let mut damaged = bytes[40..70].to_vec();
        damaged[5] ^= 0x01;
        let error = assembly.push(&damaged).expect_err("the damage is caught");
        assert!(matches!(
            error,
            Error::HashMismatch {
                start: 32,
                end: 64,
                ..
            }
        ));
        assert_eq!(assembly.next_offset(), 32);
        assembly
            .push(&bytes[32..])
            .expect("the resent bytes are intact");
        assembly.check_whole().expect("whole digest matches");
        assert_eq!(assembly.data, bytes);
    }

    #[test]
    fn more_bytes_than_asked_for_are_refused() {
        let mut assembly = Assembly::new("x".into(), 10, 20, None).expect("a small range");
        assert!(matches!(
            assembly.push(&[0u8; 11]),
            Err(Error::LengthMismatch { .. })
        ));
    }

    #[test]
    fn ranges_that_are_inverted_or_too_large_are_refused_before_allocating() {
        assert!(matches!(
            Assembly::new("x".into(), 20, 10, None),
            Err(Error::InvertedRange {
                start: 20,
                end: 10,
                ..
            })
        ));
        assert!(matches!(
            Assembly::new("x".into(), 0, u64::MAX, None),
            Err(Error::ObjectTooLarge { len: u64::MAX, .. })
        ));
        assert!(matches!(
            Assembly::new("x".into(), 1, MAX_COMPONENT_BYTES + 2, None),
            Err(Error::ObjectTooLarge { .. })
        ));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        let pauses: Vec<_> = (1..=4).map(|failures| policy.backoff(failures)).collect();
        assert_eq!(
            pauses,
            [100, 200, 350, 350].map(Duration::from_millis).to_vec()
        );
    }

    fn failure(port: u16, error: Error) -> ServerFailure {
        ServerFailure {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            error: Box::new(error),
        }
    }

    fn dtype_unavailable(port: u16) -> Error {
        Error::DtypeUnavailable {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            requested: Dtype::F16,
            served: Dtype::F32,
        }
    }

    #[test]
    fn servers_that_all_serve_another_dtype_give_the_dtype_error() {
        let error = collapse_failures(vec![
            failure(1, dtype_unavailable(1)),
            failure(2, dtype_unavailable(2)),
        ]);
        assert!(
            matches!(
                error,
                Error::DtypeUnavailable {
                    addr,
                    requested: Dtype::F16,
                    served: Dtype::F32,
                } if addr.port() == 1
            ),
            "{error}"
        );
        assert!(error.is_bad_input());
        assert_eq!(error.recovery(), Recovery::GiveUp);
        assert!(
            error.to_string().contains("start it with --dtype f16"),
            "{error}"
        );
    }

    #[test]
    fn a_dtype_refusal_among_outages_keeps_the_whole_list() {
        let timeout = Error::Timeout {
            during: "waiting for the manifest",
            timeout: Duration::from_secs(1),
        };
        let error = collapse_failures(vec![failure(1, timeout), failure(2, dtype_unavailable(2))]);
        assert!(
            matches!(&error, Error::NoServerReachable { failures } if failures.len() == 2),
            "{error}"
        );
        assert!(error.to_string().contains("serves f32 weights, not f16"));
        assert!(!error.is_bad_input());
    }
}
