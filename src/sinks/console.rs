//! The console sink: one line per event on stdout, for trying the gateway out.

use std::io::Write as _;
use std::sync::Arc;

use fieldgate_core::envelope::{OutputFormat, write_event};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use toml::Spanned;

use super::{SinkContext, SinkSpec};
use crate::buffer::{BufferConfig, SinkBuffer};
use crate::telemetry::Metrics;

/// `[sinks.NAME]` with `type = "console"`: one line per event on stdout.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSinkConfig {
    /// Sources to read.
    pub inputs: Spanned<Vec<String>>,
    /// Buffer in front of the sink.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Envelope or raw device JSON.
    #[serde(default)]
    pub format: OutputFormat,
}

impl SinkSpec for ConsoleSinkConfig {
    fn inputs(&self) -> &Spanned<Vec<String>> {
        &self.inputs
    }

    fn inputs_mut(&mut self) -> &mut toml::Spanned<Vec<String>> {
        &mut self.inputs
    }

    fn buffer(&self) -> &BufferConfig {
        &self.buffer
    }

    fn build(&self, context: SinkContext) -> BoxFuture<'static, ()> {
        let config = self.clone();
        Box::pin(async move {
            run(context.buffer, &config, context.metrics, context.stop).await;
        })
    }
}

/// Events written per stdout flush.
const BATCH: usize = 256;

/// Writes events to stdout until `shutdown`.
pub async fn run(
    buffer: Arc<SinkBuffer>,
    config: &ConsoleSinkConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let format: OutputFormat = config.format;
    let sent = metrics
        .sent_events
        .get_or_create(&Metrics::sink(buffer.sink()))
        .clone();
    let mut line = Vec::with_capacity(1024);
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            batch = buffer.next_batch(BATCH) => batch,
        };
        line.clear();
        for delivery in &batch {
            write_event(format, &delivery.event, &mut line);
            line.push(b'\n');
        }
        let mut stdout = std::io::stdout().lock();
        if let Err(err) = stdout.write_all(&line).and_then(|()| stdout.flush()) {
            // stdout closed: keep the events buffered and stop this sink.
            tracing::warn!(sink = buffer.sink(), error = %err, "console sink cannot write to stdout; stopping it");
            buffer.rewind();
            return;
        }
        drop(stdout);
        sent.inc_by(batch.len() as u64);
        buffer.ack(batch.iter().map(|delivery| (delivery.lane, delivery.id)));
    }
}
