//! TLS material from PEM files: the device listener's server config (optional client
//! certificate check) and the MQTT sink's client config (CA file or system roots,
//! optional client certificate).

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

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

/// Builds a listener's acceptor: server certificate chain and key, and when `client_ca`
/// is given, client certificates must be signed by it.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
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

/// Builds a client configuration: trust `ca` (system roots without it), and present
/// `client_cert` (certificate chain and key) for mutual TLS when given.
pub fn client_config(
    ca: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = match ca {
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
    let client = match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|err| TlsError::Rustls(err.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(client))
}

/// A listener's TLS acceptor that can be re-read from its files while the listener
/// runs: new connections use the new material, open ones keep theirs.
pub struct ReloadableTls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    client_ca: Option<std::path::PathBuf>,
    acceptor: std::sync::RwLock<TlsAcceptor>,
}

impl ReloadableTls {
    /// Reads the material for the first time.
    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ReloadableTls, TlsError> {
        Ok(ReloadableTls {
            acceptor: std::sync::RwLock::new(acceptor(cert, key, client_ca)?),
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
        })
    }

    /// Re-reads the files, without using them yet.
    pub fn prepare(&self) -> Result<TlsAcceptor, TlsError> {
        acceptor(&self.cert, &self.key, self.client_ca.as_deref())
    }

    /// Uses `fresh` (from [`ReloadableTls::prepare`]) for new connections.
    pub fn install(&self, fresh: TlsAcceptor) {
        match self.acceptor.write() {
            Ok(mut current) => *current = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }

    /// The acceptor for the next connection.
    pub fn current(&self) -> TlsAcceptor {
        match self.acceptor.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}
