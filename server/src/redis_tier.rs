//! The cache tier that weight servers share through Redis.
//!
//! Values are content-addressed: a component's key holds the model
//! revision, the dtype it is served in and the blake3 hash of its bytes, so
//! servers pointing at one Redis agree on keys without coordinating, and a
//! changed model never reads stale bytes. A component is stored in pieces of
//! [`PIECE_BYTES`], one key each, so no single value is large.
//!
//! Redis is a shortcut, never a dependency: every failure (down, slow, wiped,
//! a value that fails its hash) makes the lookup a miss, so the caller goes
//! to the origin. Errors are counted each time and logged once per outage;
//! after an error the tier is skipped for a short while instead of making
//! every fetch wait on a dead Redis, then tried again, and the connection
//! manager reconnects by itself.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use surf_transport::{Component, Digest, Dtype};

use crate::Error;
use crate::metrics::Stats;

/// Size of one stored piece of a component.
pub const PIECE_BYTES: usize = 4 * 1024 * 1024;
/// How long a connection attempt to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long one command may take, for each piece it moves, before Redis
/// counts as slow (and the lookup as a miss).
const PIECE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the tier is skipped after an error, at first and at most.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// Where the shared tier is and how its keys are made.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// Put before every key, so that one Redis can hold other data too.
    pub prefix: String,
    /// How long a stored piece lives; `None` keeps it until Redis evicts it.
    pub ttl: Option<Duration>,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "surf".to_owned(),
            ttl: Some(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// Every piece, checked against the component's hash.
    Hit(Bytes),
    /// Not (all) there, or Redis could not be asked.
    Miss,
}

/// One server's handle on the shared tier. Cheap to clone.
#[derive(Clone)]
pub struct RedisTier {
    connection: ConnectionManager,
    prefix: Arc<str>,
    ttl: Option<Duration>,
    stats: Arc<Stats>,
    health: Arc<Mutex<Health>>,
}

/// Whether Redis answered lately, to log an outage once and to skip the tier
/// for a while after an error.
#[derive(Debug, Default)]
struct Health {
    failing_since: Option<Instant>,
    skip_until: Option<Instant>,
    pause: Duration,
}

impl RedisTier {
    /// Prepares the connection without waiting for it: a server starts, and
    /// serves from its origin, while Redis is down.
    pub fn connect(config: &RedisConfig, stats: Arc<Stats>) -> Result<Self, Error> {
        let client =
            redis::Client::open(config.url.as_str()).map_err(|source| Error::RedisUrl {
                url: config.url.clone(),
                detail: source.to_string(),
            })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            // Each command gets its own deadline below, sized to what it moves.
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let connection =
            ConnectionManager::new_lazy_with_config(client, manager_config).map_err(|source| {
                Error::RedisUrl {
                    url: config.url.clone(),
                    detail: source.to_string(),
                }
            })?;
        Ok(RedisTier {
            connection,
            prefix: config.prefix.as_str().into(),
            ttl: config.ttl,
            stats,
            health: Arc::new(Mutex::new(Health::default())),
        })
    }

    /// The key of one piece of `component` as served in `dtype` from the
    /// model of `revision`.
    pub fn piece_key(
        &self,
        revision: &str,
        dtype: Dtype,
        component: &Component,
        piece: usize,
    ) -> String {
        piece_key(&self.prefix, revision, dtype, &component.hash, piece)
    }

    /// Every key that `component` is stored under.
    pub fn keys(&self, revision: &str, dtype: Dtype, component: &Component) -> Vec<String> {
        (0..piece_count(component.byte_len))
            .map(|piece| self.piece_key(revision, dtype, component, piece))
            .collect()
    }

    /// The component's bytes from Redis, checked against its hash. A value
    /// that fails the check is deleted, so that the origin's bytes replace it.
    pub async fn lookup(&self, revision: &str, dtype: Dtype, component: &Component) -> Lookup {
        if self.skipping() {
            self.stats.redis_misses.increment();
            return Lookup::Miss;
        }
        let keys = self.keys(revision, dtype, component);
        let mut connection = self.connection.clone();
        let read = self
            .command(
                keys.len(),
                redis::cmd("MGET")
                    .arg(&keys)
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut connection),
            )
            .await;
        let Some(pieces) = read.and_then(|pieces| pieces.into_iter().collect::<Option<Vec<_>>>())
        else {
            self.stats.redis_misses.increment();
            return Lookup::Miss;
        };
        let expected = component.hash;
        let byte_len = component.byte_len;
        // Joining and hashing tens of MiB is CPU work: keep it off the
        // async workers.
        let checked =
            tokio::task::spawn_blocking(move || join_checked(pieces, byte_len, &expected))
                .await
                .ok()
                .flatten();
        match checked {
            Some(bytes) => {
                self.stats.redis_hits.increment();
                Lookup::Hit(bytes)
            }
            None => {
                tracing::warn!(component = %component.name, "a value in Redis failed its hash check; replacing it from the origin");
                self.stats.redis_errors.increment();
                self.stats.redis_misses.increment();
                self.delete(&keys).await;
                Lookup::Miss
            }
        }
    }

    /// Stores the component's bytes in the background: the caller's reply
    /// does not wait for Redis.
    pub fn store_in_background(
        &self,
        revision: &str,
        dtype: Dtype,
        component: &Component,
        bytes: Bytes,
    ) {
        if self.skipping() {
            return;
        }
        let tier = self.clone();
        let keys = self.keys(revision, dtype, component);
        self.stats.redis_writes_pending.increment();
        tokio::spawn(async move {
            tier.store(&keys, &bytes).await;
            tier.stats.redis_writes_pending.decrement();
        });
    }

    async fn store(&self, keys: &[String], bytes: &Bytes) {
        let mut pipe = redis::pipe();
        for (key, piece) in keys.iter().zip(pieces_of(bytes)) {
            let set = pipe.cmd("SET").arg(key).arg(piece.as_ref());
            if let Some(ttl) = self.ttl {
                set.arg("PX").arg(ttl.as_millis().max(1) as u64);
            }
            set.ignore();
        }
        let mut connection = self.connection.clone();
        let written = self
            .command(keys.len(), pipe.query_async::<()>(&mut connection))
            .await;
        if written.is_some() {
            self.stats.redis_writes.increment();
        }
    }

    async fn delete(&self, keys: &[String]) {
        let mut connection = self.connection.clone();
        let mut delete = redis::cmd("DEL");
        delete.arg(keys);
        self.command(1, delete.query_async::<()>(&mut connection))
            .await;
    }

    /// Runs one command that moves `pieces` pieces under its deadline, and
    /// notes whether Redis answered; `None` when it did not.
    async fn command<T>(
        &self,
        pieces: usize,
        command: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(deadline(pieces), command).await {
            Ok(Ok(value)) => {
                self.answered();
                Some(value)
            }
            Ok(Err(error)) => {
                self.failed(&error.to_string());
                None
            }
            Err(_) => {
                self.failed("no answer within the deadline");
                None
            }
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn skipping(&self) -> bool {
        self.health()
            .skip_until
            .is_some_and(|until| Instant::now() < until)
    }

    fn answered(&self) {
        let mut health = self.health();
        if let Some(since) = health.failing_since.take() {
            tracing::info!(down_for = ?since.elapsed(), "Redis answers again; the shared cache tier is back");
        }
        health.skip_until = None;
        health.pause = Duration::ZERO;
    }

    fn failed(&self, detail: &str) {
        self.stats.redis_errors.increment();
        let mut health = self.health();
        if health.failing_since.is_none() {
            tracing::warn!(%detail, "Redis is unavailable; serving from the origin until it returns");
            health.failing_since = Some(Instant::now());
        }
        health.pause = (health.pause * 2).clamp(FIRST_PAUSE, LONGEST_PAUSE);
        health.skip_until = Some(Instant::now() + health.pause);
    }
}

/// `{prefix}:{revision}:{dtype}:{blake3 hex}:{piece}`.
fn piece_key(prefix: &str, revision: &str, dtype: Dtype, hash: &Digest, piece: usize) -> String {
    format!("{prefix}:{revision}:{dtype}:{hash}:{piece}")
}

/// How many pieces hold `byte_len` bytes; an empty component is one empty piece.
fn piece_count(byte_len: u64) -> usize {
    (byte_len as usize).div_ceil(PIECE_BYTES).max(1)
}

fn pieces_of(bytes: &Bytes) -> Vec<Bytes> {
    if bytes.is_empty() {
        return vec![Bytes::new()];
    }
    (0..bytes.len())
        .step_by(PIECE_BYTES)
        .map(|start| bytes.slice(start..(start + PIECE_BYTES).min(bytes.len())))
        .collect()
}

/// The pieces joined, when they add up to `byte_len` bytes with the hash
/// `expected`.
fn join_checked(pieces: Vec<Vec<u8>>, byte_len: u64, expected: &Digest) -> Option<Bytes> {
    let total: usize = pieces.iter().map(Vec::len).sum();
    if total as u64 != byte_len {
        return None;
    }
    let mut joined = Vec::with_capacity(total);
    for piece in pieces {
        joined.extend_from_slice(&piece);
    }
    expected
        .matches(&blake3::hash(&joined))
        .then(|| Bytes::from(joined))
}

/// A deadline for a command that moves `pieces` pieces.
fn deadline(pieces: usize) -> Duration {
    PIECE_TIMEOUT * pieces.clamp(1, 1024) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_bytes_in_order_and_rejoin_only_with_the_right_hash() {
        for len in [
            0,
            1,
            PIECE_BYTES - 1,
            PIECE_BYTES,
            PIECE_BYTES + 1,
            3 * PIECE_BYTES + 7,
        ] {
            let bytes = Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>());
            let pieces = pieces_of(&bytes);
            assert_eq!(pieces.len(), piece_count(len as u64), "len {len}");
            assert!(pieces.iter().all(|piece| piece.len() <= PIECE_BYTES));
            let digest = Digest::of(&bytes);
            let owned: Vec<Vec<u8>> = pieces.iter().map(|piece| piece.to_vec()).collect();
            assert_eq!(
                join_checked(owned.clone(), len as u64, &digest),
                Some(bytes.clone())
            );
            // One byte changed, or one piece lost: rejected.
            if len > 0 {
                let mut damaged = owned.clone();
                damaged[0][0] ^= 1;
                assert_eq!(join_checked(damaged, len as u64, &digest), None);
                let mut short = owned;
                short.pop();
                assert_eq!(join_checked(short, len as u64, &digest), None);
            }
        }
    }

    #[test]
    fn keys_name_the_revision_dtype_hash_and_piece() {
        let hash = Digest::of(b"layer bytes");
        let key = piece_key("eu", "rev1", Dtype::F16, &hash, 3);
        assert_eq!(key, format!("eu:rev1:f16:{hash}:3"));
        assert_ne!(key, piece_key("eu", "rev2", Dtype::F16, &hash, 3));
        assert_ne!(key, piece_key("eu", "rev1", Dtype::F32, &hash, 3));
    }
}
