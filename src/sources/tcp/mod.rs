//! The TCP device source: a listener, one task per connection.
//!
//! Connections beyond `max_connections` wait in the kernel's accept queue. Each
//! connection is handled by [`connection`], which owns its socket and nothing else.

mod config;
mod connection;
pub(crate) mod stream;

use std::sync::Arc;
use std::time::Duration;

use fieldgate_codec::Framing;
use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use self::config::{AuthMode, FramingConfig, ListenerTlsConfig, TcpSourceConfig};
use self::stream::DeviceStream;
use super::{RunningSource, SourceContext, SourceSpec};
use crate::config::{ConfigError, Context, ListenerClaims, Settings};
use crate::devices::DeviceServices;
use crate::net::limits::FdUser;
use crate::net::tls::ReloadableTls;
use crate::pipeline::SourceOutput;
use crate::telemetry::Metrics;

/// Settings every connection of a source shares.
pub struct SourceSettings {
    /// Source name from the config.
    pub name: Arc<str>,
    /// Frame delimiting.
    pub framing: Framing,
    /// Largest frame.
    pub max_frame: usize,
    /// Whether a hello with a token is required.
    pub auth: AuthMode,
    /// Accepted tokens.
    pub tokens: Vec<String>,
    /// Answer every message once stored.
    pub ack: bool,
    /// Frames per second per connection; 0 = unlimited.
    pub max_frames_per_second: u32,
    /// Protocol errors before closing.
    pub max_errors: u32,
    /// Silence after which a device is closed.
    pub idle_timeout: Duration,
    /// Time allowed to finish a started frame (and a TLS handshake).
    pub frame_timeout: Duration,
    /// Time a new connection has to name a device; heartbeats do not extend it.
    pub hello_timeout: Duration,
    /// Largest frame before a hello has authenticated the connection (`token`, `registry`).
    pub unauthenticated_max_frame: usize,
}

/// Shared by the listener and its connections.
pub struct SourceShared {
    /// Settings.
    pub settings: SourceSettings,
    /// Where events go.
    pub output: SourceOutput,
    /// Directory, registry, commands and auth throttle.
    pub services: Arc<DeviceServices>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// `fieldgate_connections{source}`.
    pub connections: Gauge,
    /// `fieldgate_received_events_total{source}`.
    pub received: Counter,
}

/// Pending connections the kernel may queue: a reconnect storm of thousands of devices
/// must not overflow the accept queue (the kernel caps it at `net.core.somaxconn`).
const ACCEPT_BACKLOG: u32 = 4096;

/// Binds a listener with a deep accept queue, `SO_REUSEADDR` (restart while old
/// connections linger in TIME_WAIT) and `SO_REUSEPORT` (a reload binds the new listener
/// before it closes the old one).
fn listen(address: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // A reload rebinds a changed source's address before the old listener closes.
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// A TCP source, built from config and bound, ready to run.
pub struct TcpSource {
    shared: Arc<SourceShared>,
    listener: TcpListener,
    tls: Option<Arc<ReloadableTls>>,
    max_connections: usize,
}

impl TcpSource {
    /// Builds the source and binds its listener.
    pub async fn bind(
        name: &str,
        config: &TcpSourceConfig,
        output: SourceOutput,
        services: Arc<DeviceServices>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let address = *config.address.get_ref();
        let tls = config
            .tls
            .as_ref()
            .map(|tls| ReloadableTls::load(&tls.cert, &tls.key, tls.client_ca.as_deref()))
            .transpose()
            .with_context(|| format!("source `{name}`: TLS set-up failed"))?
            .map(Arc::new);
        let listener = listen(address)
            .with_context(|| format!("source `{name}`: cannot listen on {address}"))?;
        let label = Metrics::source(name);
        let settings = SourceSettings {
            name: Arc::from(name),
            framing: match config.framing {
                FramingConfig::Lines => Framing::Lines,
                FramingConfig::LengthPrefixed => Framing::LengthPrefixed,
            },
            max_frame: usize::try_from(config.max_frame.0).unwrap_or(usize::MAX),
            auth: config.auth,
            tokens: config.tokens.clone(),
            ack: config.ack,
            max_frames_per_second: config.max_frames_per_second,
            max_errors: config.max_errors.max(1),
            idle_timeout: config.heartbeat_interval.0 * config.heartbeat_misses.max(1),
            frame_timeout: config.frame_timeout.0,
            hello_timeout: config.hello_timeout.0,
            unauthenticated_max_frame: usize::try_from(
                config.unauthenticated_max_frame.0.min(config.max_frame.0),
            )
            .unwrap_or(usize::MAX),
        };
        let shared = SourceShared {
            settings,
            output,
            services,
            connections: metrics.connections.get_or_create(&label).clone(),
            received: metrics.received_events.get_or_create(&label).clone(),
            metrics: Arc::clone(&metrics),
        };
        Ok(Self {
            shared: Arc::new(shared),
            listener,
            tls,
            max_connections: config.max_connections.max(1),
        })
    }

    /// Accepts until `shutdown`, then waits for its connections to close.
    pub async fn run(self, shutdown: CancellationToken) {
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let connections = TaskTracker::new();
        let name = Arc::clone(&self.shared.settings.name);
        let address = self.listener.local_addr().map_or_else(
            |err| format!("unknown ({err})"),
            |address| address.to_string(),
        );
        tracing::info!(source = %name, %address, tls = self.tls.is_some(), "accepting devices");
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = Arc::clone(&limit).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (socket, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(source = %name, error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Near RLIMIT_NOFILE the last descriptors are for buffers and the registry.
            if !self.shared.services.fds.admit(FdUser::Device) {
                self.shared.metrics.refused(&name, "fd_reserve");
                tracing::warn!(source = %name, %peer, reason = "fd_reserve", "connection refused: file descriptors are running out");
                drop(socket);
                continue;
            }
            // Small frames and acks must not wait for Nagle.
            if let Err(err) = socket.set_nodelay(true) {
                tracing::debug!(source = %name, %peer, error = %err, "cannot set TCP_NODELAY");
            }
            let shared = Arc::clone(&self.shared);
            // A clone, not a child token: children cost an allocation per connection.
            let shutdown = shutdown.clone();
            // Unique across sources: the directory tells sessions apart by it.
            let id = shared.services.directory.next_connection_id();
            let span = tracing::info_span!("device", source = %name, %peer, conn = id, device = tracing::field::Empty);
            // Plain and TLS connections are spawned as different futures, so an idle plain
            // connection does not carry the (large) TLS handshake state in its task.
            match &self.tls {
                None => {
                    let stream = DeviceStream::Plain(socket);
                    connections.spawn(
                        connection::serve(shared, stream, peer, id, shutdown, permit)
                            .instrument(span),
                    );
                }
                Some(tls) => {
                    let acceptor = tls.current();
                    connections.spawn(
                        async move {
                            let handshake = tokio::time::timeout(
                                shared.settings.frame_timeout,
                                acceptor.accept(socket),
                            );
                            match handshake.await {
                                Ok(Ok(stream)) => {
                                    let stream = DeviceStream::Tls(Box::new(stream));
                                    Box::pin(connection::serve(
                                        shared, stream, peer, id, shutdown, permit,
                                    ))
                                    .await;
                                }
                                Ok(Err(err)) => {
                                    tracing::info!(error = %err, "TLS handshake failed");
                                    shared
                                        .metrics
                                        .auth_failures
                                        .get_or_create(&Metrics::source(&shared.settings.name))
                                        .inc();
                                }
                                Err(_) => tracing::info!("TLS handshake timed out"),
                            }
                        }
                        .instrument(span),
                    );
                }
            }
        }
        drop(self.listener);
        connections.close();
        connections.wait().await;
        tracing::info!(source = %name, "source stopped");
    }
}

impl TcpSourceConfig {
    /// Why a source whose devices name themselves without proof cannot share a gateway
    /// with the registry: one device id namespace, so a claimed id could be a registered
    /// device's.
    fn unproven_beside_registry(&self) -> String {
        let mode = match self.auth {
            AuthMode::None => "\"none\"",
            AuthMode::Token => "\"token\"",
            AuthMode::Registry => "\"registry\"",
        };
        format!(
            "auth = {mode} cannot be used beside [registry]: its devices name themselves without \
             proof, so one could claim a registered device's id, receive that device's commands \
             and report their results; use auth = \"registry\" on this source, or run \
             unregistered devices on a gateway without [registry]"
        )
    }
}

impl SourceSpec for TcpSourceConfig {
    fn check(
        &self,
        name: &str,
        settings: &Settings,
        listeners: &mut ListenerClaims<'_>,
        context: &Context<'_>,
    ) -> Result<(), ConfigError> {
        listeners.claim(&self.address, format!("sources.{name}.address"))?;
        self.check_fields(context, name)?;
        let key = |field: &str| format!("sources.{name}.{field}");
        if self.auth == AuthMode::Registry && settings.registry.is_none() {
            return Err(
                context.key_error(&key("auth"), "auth = \"registry\" needs a [registry] table")
            );
        }
        if settings.registry.is_some() && self.auth != AuthMode::Registry {
            return Err(context.key_error(&key("auth"), self.unproven_beside_registry()));
        }
        if self.auth == AuthMode::Token && self.tokens.is_empty() {
            return Err(
                context.key_error(&key("tokens"), "auth = \"token\" needs at least one token")
            );
        }
        if settings.gateway.partial_frame_budget.0 < self.max_frame.0 {
            return Err(context.key_error(
                "gateway.partial_frame_budget",
                "must be at least 64KiB and at least the largest max_frame of a source",
            ));
        }
        Ok(())
    }

    fn largest_event(&self) -> u64 {
        self.max_frame.0
    }

    fn build<'a>(
        &'a self,
        name: &'a str,
        context: SourceContext,
    ) -> BoxFuture<'a, anyhow::Result<RunningSource>> {
        Box::pin(async move {
            let source = TcpSource::bind(
                name,
                self,
                context.output,
                context.services,
                context.metrics,
            )
            .await?;
            let tls = source.tls.clone();
            Ok(RunningSource {
                task: Box::pin(source.run(context.stop)),
                tls,
            })
        })
    }
}
