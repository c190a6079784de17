//! `fieldgate-sim`: simulated devices and load for a fieldgate gateway.
//!
//! Scenarios: `tcp` (devices on a gateway TCP source), `mqtt` (devices on an
//! MQTT broker, to measure a peer such as Mosquitto), `idle` (held
//! connections) and `storm` (connect churn). tcp and mqtt can measure delivery
//! upstream with an MQTT subscriber. Every run is bounded and ends with a JSON
//! summary on stdout.
#![forbid(unsafe_code)]

mod cli;
mod extract;
mod framing;
mod idle;
mod mqtt;
mod net;
mod pacing;
mod run;
mod stats;
mod storm;
mod subscriber;
mod tcp;
mod template;
mod tokens;
mod tracker;

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command, MqttArgs, TcpArgs};
use crate::mqtt::{BrokerUrl, MqttPlan};
use crate::net::Connector;
use crate::run::{DeviceModel, RunShared, SubscribeSpec};
use crate::tcp::TcpPlan;
use crate::tokens::HelloTokens;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the tokio runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the chosen scenario with Ctrl-C wired to a graceful stop.
async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let ctrl_c = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: stopping and printing the summary");
                cancel.cancel();
            }
        }
    });
    let result = match cli.command {
        Command::Tcp(args) => run_tcp(args, cancel).await,
        Command::Mqtt(args) => run_mqtt(args, cancel).await,
        Command::Idle(args) => stats::print_json(&idle::run(args, cancel).await?),
        Command::Storm(args) => stats::print_json(&storm::run(args, cancel).await?),
    };
    ctrl_c.abort();
    result
}

async fn run_tcp(args: TcpArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let measures = args.subscribe.subscribe.is_some();
    let model = DeviceModel::new(
        &args.device,
        args.subscribe.drain_timeout,
        args.ack || measures,
        measures,
    )?;
    net::warn_if_fd_limit_low(model.devices());
    let tokens = HelloTokens::load(&args.target)?;
    tokens.check_covers((0..model.devices()).map(|slot| model.ids.name(slot)))?;
    let connector = Connector::new(
        &args.target.target,
        args.target.tls(),
        args.target.allow_remote,
    )
    .await
    .context("tcp target")?;
    let run = Arc::new(RunShared::new(model.devices(), cancel));
    let plan = Arc::new(TcpPlan {
        connector,
        framing: args.target.framing,
        hello: args.target.sends_hello(),
        tokens,
        ack: args.ack,
        model,
    });
    let subscribe = measures.then_some(SubscribeSpec {
        args: &args.subscribe,
        tls: &args.target.tls_args,
        allow_remote: args.target.allow_remote,
    });
    let summary = run::run_devices(
        "tcp",
        &plan.model,
        args.ack,
        subscribe,
        Arc::clone(&run),
        |slot| tcp::device(Arc::clone(&plan), Arc::clone(&run), slot),
    )
    .await?;
    stats::print_json(&summary)
}

async fn run_mqtt(args: MqttArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let measures = args.subscribe.subscribe.is_some();
    let model = DeviceModel::new(
        &args.device,
        args.subscribe.drain_timeout,
        measures,
        measures,
    )?;
    net::warn_if_fd_limit_low(model.devices());
    let broker = BrokerUrl::parse(&args.url)?;
    net::resolve(&broker.host_port(), args.allow_remote)
        .await
        .context("mqtt broker")?;
    let tls = broker
        .tls
        .then(|| net::client_tls_config(&args.tls_args))
        .transpose()?;
    let run = Arc::new(RunShared::new(model.devices(), cancel));
    let plan = Arc::new(MqttPlan {
        model,
        broker,
        protocol: args.protocol,
        tls,
        topic: args.topic.clone(),
        qos: args.qos,
    });
    let subscribe = measures.then_some(SubscribeSpec {
        args: &args.subscribe,
        tls: &args.tls_args,
        allow_remote: args.allow_remote,
    });
    let summary = run::run_devices(
        "mqtt",
        &plan.model,
        args.qos > 0,
        subscribe,
        Arc::clone(&run),
        |slot| mqtt::device(Arc::clone(&plan), Arc::clone(&run), slot),
    )
    .await?;
    stats::print_json(&summary)
}
