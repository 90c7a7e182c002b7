//! The self-signed certificate a server makes when it is given none.

use std::net::SocketAddr;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::Error;

/// A fresh self-signed certificate for `localhost` (and `listen`'s address
/// when it is not a wildcard) with its private key.
pub fn self_signed_certificate(
    listen: SocketAddr,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), Error> {
    self_signed(listen).map(|(certificate, key, _pem)| (certificate, key))
}

pub(super) fn self_signed(
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
