//! The rustls client configuration for `mqtts://`: CA file or system roots, optional
//! client certificate for mutual TLS.

use std::sync::Arc;

use rustls::RootCertStore;

use crate::config::ClientTlsConfig;
use crate::sources::tcp::tls::{TlsError, load_certs, load_key, load_roots};

/// Builds the client configuration.
pub fn client_config(
    config: Option<&ClientTlsConfig>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = match config.and_then(|tls| tls.ca.as_deref()) {
        Some(ca) => load_roots(ca)?,
        None => {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // Unusable system certificates are skipped, as every TLS client does.
                let _skipped = roots.add(cert);
            }
            roots
        }
    };
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let client = match config.and_then(|tls| tls.cert.as_deref().zip(tls.key.as_deref())) {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|err| TlsError::Rustls(err.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(client))
}
