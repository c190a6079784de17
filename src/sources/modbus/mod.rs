//! Modbus sources: `type = "modbus_tcp"` polls one device (or gateway unit) over TCP,
//! `type = "modbus_rtu"` polls the devices of one serial bus. Each source runs one
//! [`poller`] task over one link; see docs/MODBUS.md for the point table, the event
//! payload and the metrics.
//!
//! Modules: [`config`] (keys, CSV point tables, validation), [`value`] (registers ↔
//! typed values), [`plan`] (coalescing reads), [`client`] (the link and its errors),
//! [`report`] (payload, quality, deadband), [`write`] (commands to write requests),
//! [`poller`] (scheduling), [`metrics`].

pub mod client;
pub mod config;
pub mod metrics;
pub mod plan;
pub mod poller;
pub mod report;
pub mod value;
pub mod write;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tracing::Instrument as _;

use self::client::{Link, SerialSettings};
use self::config::PollPlan;
pub use self::config::{ModbusRtuConfig, ModbusTcpConfig};
use self::metrics::SourceMetrics;
pub use self::metrics::declare_metrics;
use self::poller::Poller;
use self::value::DataType;
use super::{RunningSource, SourceContext, SourceSpec};
use crate::config::{ConfigError, Context, ListenerClaims, Settings};

/// Payload bytes one point can take at most: its name three times (value, quality,
/// units; JSON-escaped, so up to twice its length), the value, the quality and the unit.
fn point_bound(point: &config::Point) -> u64 {
    let name = 2 * point.name.len() as u64 + 4;
    let value = match point.data_type {
        // Lossy UTF-8 turns a bad byte into 3; JSON escapes a control byte into 6.
        DataType::String => 6 * 2 * u64::from(point.width) + 2,
        _ => 32,
    };
    let unit = point
        .unit
        .as_ref()
        .map_or(0, |unit| 2 * unit.len() as u64 + 4);
    3 * name + value + 10 + unit
}

/// The largest event a poll plan can produce (a payload or a command result).
fn largest_event(plan: Option<&PollPlan>) -> u64 {
    const FRAME: u64 = 128;
    const COMMAND_RESULT: u64 = 4096;
    match plan {
        Some(plan) => plan
            .devices
            .iter()
            .map(|device| device.points.iter().map(point_bound).sum::<u64>() + FRAME)
            .max()
            .unwrap_or(FRAME)
            .max(COMMAND_RESULT),
        // An invalid config never runs; `check` reports it before this matters.
        None => COMMAND_RESULT,
    }
}

impl SourceSpec for ModbusTcpConfig {
    fn check(
        &self,
        name: &str,
        _settings: &Settings,
        _listeners: &mut ListenerClaims<'_>,
        context: &Context<'_>,
    ) -> Result<(), ConfigError> {
        self.resolve(name, context).map(drop)
    }

    fn largest_event(&self) -> u64 {
        largest_event(self.resolve("", &Context::running()).ok().as_ref())
    }

    fn build<'a>(
        &'a self,
        name: &'a str,
        context: SourceContext,
    ) -> BoxFuture<'a, anyhow::Result<RunningSource>> {
        Box::pin(async move {
            let plan = self.resolve(name, &Context::running())?;
            let link = Link::Tcp(self.address.get_ref().clone());
            Ok(start(name, link, plan, context))
        })
    }
}

impl SourceSpec for ModbusRtuConfig {
    fn check(
        &self,
        name: &str,
        _settings: &Settings,
        _listeners: &mut ListenerClaims<'_>,
        context: &Context<'_>,
    ) -> Result<(), ConfigError> {
        self.resolve(name, context).map(drop)
    }

    fn largest_event(&self) -> u64 {
        largest_event(self.resolve("", &Context::running()).ok().as_ref())
    }

    fn build<'a>(
        &'a self,
        name: &'a str,
        context: SourceContext,
    ) -> BoxFuture<'a, anyhow::Result<RunningSource>> {
        Box::pin(async move {
            let plan = self.resolve(name, &Context::running())?;
            let link = Link::Rtu(SerialSettings {
                port: self.port.clone(),
                baud: self.baud,
                parity: self.parity,
                stop_bits: self.stop_bits,
                data_bits: self.data_bits,
            });
            Ok(start(name, link, plan, context))
        })
    }
}

/// The source's task: one poller over its link.
fn start(name: &str, link: Link, plan: PollPlan, context: SourceContext) -> RunningSource {
    let protocol = match link {
        Link::Tcp(_) => "modbus_tcp",
        Link::Rtu(_) => "modbus_rtu",
    };
    let span = tracing::info_span!("modbus", source = %name, peer = %link.peer(), protocol);
    let metrics = SourceMetrics::new(&context.metrics, name);
    let poller = Poller::new(
        Arc::from(name),
        link,
        Arc::new(plan),
        context.output,
        metrics,
        context.services,
    );
    RunningSource {
        task: Box::pin(poller.run(context.stop).instrument(span)),
        tls: None,
    }
}
