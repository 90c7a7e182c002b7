//! TLS 1.3 and QUIC settings shared by the server, the client and the bench:
//! certificate loading, pinning, and a transport tuned for bulk transfer.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::Error;
use crate::wire::ALPN;

/// How long a connection may stay silent before it is considered dead; the
/// keep-alive below keeps healthy idle connections well inside it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Per-stream and per-connection flow-control windows: large enough that a
/// single stream on loopback is limited by CPU, not by window updates.
const STREAM_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;
const CONNECTION_RECEIVE_WINDOW: u32 = 128 * 1024 * 1024;
const SEND_WINDOW: u64 = 64 * 1024 * 1024;
const MAX_CONCURRENT_FETCHES: u32 = 256;
/// Largest UDP payload that path MTU discovery probes for: jumbo frames on
/// LANs and loopback carry several times more bytes per packet (and per
/// encryption and syscall); paths with a 1500-byte MTU stay at the default.
const MTU_UPPER_BOUND: u16 = 8952;

/// Reads every certificate in a PEM file.
pub fn load_certificates_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| Error::CertificateFile {
            path: path.to_owned(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(Error::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_private_key_pem(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| Error::KeyFile {
        path: path.to_owned(),
        source,
    })
}

fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The QUIC transport settings of both ends.
pub fn transport_config() -> quinn::TransportConfig {
    let mut mtu_discovery = quinn::MtuDiscoveryConfig::default();
    mtu_discovery.upper_bound(MTU_UPPER_BOUND);
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
        .receive_window(CONNECTION_RECEIVE_WINDOW.into())
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(MAX_CONCURRENT_FETCHES.into())
        .max_concurrent_uni_streams(0u32.into())
        .mtu_discovery_config(Some(mtu_discovery))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT)
                .unwrap_or(quinn::VarInt::from_u32(10_000).into()),
        ));
    transport
}

/// Server-side QUIC configuration for a certificate chain and its key.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig, Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic =
        QuicServerConfig::try_from(tls).map_err(|error| Error::QuicCrypto(error.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Client-side QUIC configuration that trusts exactly `trusted`: a server
/// presenting one of these certificates is accepted as is (pinning; names
/// and validity dates are not checked, the key proof is); otherwise the
/// server's chain must lead to one of them as a root, for the name dialled.
pub fn client_config(trusted: &[CertificateDer<'static>]) -> Result<quinn::ClientConfig, Error> {
    if trusted.is_empty() {
        return Err(Error::NoTrustedCertificates);
    }
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    let (added, _unusable_as_roots) = roots.add_parsable_certificates(trusted.iter().cloned());
    let roots_verifier = if added > 0 {
        Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|error| Error::Tls(rustls::Error::General(error.to_string())))?,
        )
    } else {
        None
    };
    let verifier = PinningVerifier {
        pinned: trusted.to_vec(),
        roots: roots_verifier,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic =
        QuicClientConfig::try_from(tls).map_err(|error| Error::QuicCrypto(error.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

#[derive(Debug)]
struct PinningVerifier {
    pinned: Vec<CertificateDer<'static>>,
    roots: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|pinned| pinned.as_ref() == end_entity.as_ref())
        {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.roots {
            Some(roots) => {
                roots.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
