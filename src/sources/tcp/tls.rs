//! TLS for the device listener: server certificate, optional client-certificate check.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

use crate::config::ListenerTlsConfig;

/// TLS material that could not be loaded.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("cannot read {what} from {path}: {reason}")]
    File {
        /// What the file should hold.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// rustls refused the material.
    #[error("invalid TLS configuration: {0}")]
    Rustls(String),
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |reason: String| TlsError::File {
        what: "certificates",
        path: path.display().to_string(),
        reason,
    };
    let file = File::open(path).map_err(|err| fail(err.to_string()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| fail(err.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let fail = |reason: String| TlsError::File {
        what: "a private key",
        path: path.display().to_string(),
        reason,
    };
    let file = File::open(path).map_err(|err| fail(err.to_string()))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|err| fail(err.to_string()))?
        .ok_or_else(|| fail("no PEM private key found".into()))
}

/// Reads a CA bundle into a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|err| TlsError::Rustls(format!("CA {}: {err}", path.display())))?;
    }
    Ok(roots)
}

/// Builds the listener's acceptor.
pub fn acceptor(config: &ListenerTlsConfig) -> Result<TlsAcceptor, TlsError> {
    let certs = load_certs(&config.cert)?;
    let key = load_key(&config.key)?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &config.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder(Arc::new(load_roots(ca)?))
                .build()
                .map_err(|err| TlsError::Rustls(err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let server = builder
        .with_single_cert(certs, key)
        .map_err(|err| TlsError::Rustls(err.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}
