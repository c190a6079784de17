//! Opening device connections: address resolution with the loopback guard,
//! optional TLS, and file-descriptor limit checks.

use std::io::{self, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::Args;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A byte stream to the gateway, plain or TLS.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// A boxed [`Conn`].
pub type BoxConn = Box<dyn Conn>;

/// TLS client options shared by the TCP devices and the MQTT clients.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "TLS")]
pub struct TlsArgs {
    /// CA certificate (PEM) to verify the server; default: the system bundle.
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; needs --key.
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS; needs --cert.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Name to verify in the server certificate (default: the target host).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
}

/// Well-known CA bundle locations, tried when --ca is not given.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Builds a rustls client configuration (ring provider) from `args`.
pub fn client_tls_config(args: &TlsArgs) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let ca_path = match &args.ca {
        Some(path) => path.clone(),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .or_else(|| {
                SYSTEM_CA_BUNDLES
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.exists())
            })
            .context("no --ca given and no system CA bundle found (set SSL_CERT_FILE)")?,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(&ca_path)? {
        roots
            .add(cert)
            .with_context(|| format!("adding a CA certificate from {}", ca_path.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            let file = std::fs::File::open(key)
                .with_context(|| format!("opening client key {}", key.display()))?;
            let key_der = rustls_pemfile::private_key(&mut BufReader::new(file))
                .with_context(|| format!("reading client key {}", key.display()))?
                .with_context(|| format!("no private key found in {}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .context("client certificate and key do not match")?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Reads every certificate in a PEM file.
fn read_certs(path: &Path) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening certificate {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate found in {}", path.display());
    }
    Ok(certs)
}

/// Resolves `host:port`; refuses non-loopback addresses unless `allow_remote`.
pub async fn resolve(host_port: &str, allow_remote: bool) -> anyhow::Result<SocketAddr> {
    let addr = tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .next()
        .with_context(|| format!("{host_port} resolved to no address"))?;
    if !allow_remote && !addr.ip().is_loopback() {
        bail!(
            "{host_port} ({addr}) is not a loopback address; pass --allow-remote to load a remote host"
        );
    }
    Ok(addr)
}

/// Opens device connections to one target, plain or TLS.
#[derive(Clone)]
pub struct Connector {
    /// The resolved target.
    pub addr: SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Connector {
    /// Resolves `target` (loopback unless `allow_remote`) and prepares TLS when `tls`.
    pub async fn new(
        target: &str,
        tls: Option<&TlsArgs>,
        allow_remote: bool,
    ) -> anyhow::Result<Self> {
        let addr = resolve(target, allow_remote).await?;
        let tls = match tls {
            None => None,
            Some(args) => {
                let config = client_tls_config(args)?;
                let host = match &args.server_name {
                    Some(name) => name.clone(),
                    None => target
                        .rsplit_once(':')
                        .map_or(target, |(host, _)| host)
                        .trim_matches(['[', ']'])
                        .to_owned(),
                };
                let name = ServerName::try_from(host.clone())
                    .with_context(|| format!("invalid TLS server name {host:?}"))?;
                Some((TlsConnector::from(config), name))
            }
        };
        Ok(Self { addr, tls })
    }

    /// Connects (and handshakes, with TLS); Nagle is off so latency is not batched away.
    pub async fn connect(&self) -> io::Result<BoxConn> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Box::new(stream)),
            Some((connector, name)) => {
                let stream = connector.connect(name.clone(), stream).await?;
                Ok(Box::new(stream))
            }
        }
    }
}

/// True for "too many open files" (EMFILE, per process) and ENFILE (system-wide), Linux numbers.
pub fn is_fd_exhaustion(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(23 | 24))
}

/// Set once the EMFILE error has been printed, so 10,000 failing connects print it once.
static FD_EXHAUSTION_REPORTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Prints the out-of-file-descriptors error on stderr, once per process.
pub fn report_fd_exhaustion(subject: &str, error: &io::Error) {
    if !FD_EXHAUSTION_REPORTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!("error: {subject}: {error}: {FD_HINT}");
    }
}

/// The hint printed with an EMFILE error.
pub const FD_HINT: &str = "too many open files: raise the limit with `ulimit -n 65536` (in this shell, for \
     fieldgate-sim and the gateway/broker) and check fs.file-max";

/// The soft RLIMIT_NOFILE of this process, read from /proc/self/limits.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Warns on stderr when `connections` will not fit under the open-files limit.
pub fn warn_if_fd_limit_low(connections: usize) {
    let needed = u64::try_from(connections)
        .unwrap_or(u64::MAX)
        .saturating_add(64);
    if let Some(limit) = open_files_limit() {
        if limit < needed {
            eprintln!(
                "warning: {connections} connections need about {needed} file descriptors but the \
                 open-files limit is {limit}; {FD_HINT}"
            );
        }
    }
}
