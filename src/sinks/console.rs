//! The console sink: one line per event on stdout, for trying the gateway out.

use std::io::Write as _;
use std::sync::Arc;

use fieldgate_core::envelope::write_event;
use tokio_util::sync::CancellationToken;

use crate::buffer::SinkBuffer;
use crate::config::{ConsoleSinkConfig, OutputFormat};
use crate::telemetry::Metrics;

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
