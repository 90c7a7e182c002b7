//! What a client is told: its servers, whom to trust, how long to wait and
//! how often to try again.

use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use crate::manifest::Dtype;

/// How long to wait for the server before calling it unresponsive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The QUIC and TLS handshake with one server.
    pub connect: Duration,
    /// Any single step after that: the manifest, a fetch reply, the next
    /// bytes of a fetch. A server that stays silent this long is failed over.
    pub response: Duration,
    /// The whole of one fetch, its retries and failovers included: a server
    /// that trickles bytes, or several that fail in turn, end the fetch with
    /// [`crate::Error::FetchDeadline`] once this has passed.
    pub fetch: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(10),
            fetch: Duration::from_secs(120),
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
    /// The model to ask for, by the name the servers give it; `None` asks
    /// for each server's first model.
    pub model: Option<String>,
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
            model: None,
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
