//! `fieldgate`: a lightweight IoT edge gateway. Devices in, durable store-and-forward,
//! cloud MQTT out.
#![forbid(unsafe_code)]

mod api;
mod buffer;
mod cli_alarms;
mod cli_deadletter;
mod cli_devices;
#[cfg(feature = "modbus")]
mod cli_modbus;
mod cli_rules;
mod clock;
mod config;
mod data_dir;
mod devices;
mod net;
mod pipeline;
mod sinks;
mod sources;
mod telemetry;
mod topology;
mod transforms;

/// Unit tests count allocations (the `allocations_per_event` benchmark); outside a dhat
/// profiler this allocator only forwards to the system's.
#[cfg(test)]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `fieldgate --version`: the version, then the commit, target and features (from build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("FIELDGATE_COMMIT"),
    "\ntarget: ",
    env!("FIELDGATE_TARGET"),
    "\nfeatures: ",
    env!("FIELDGATE_FEATURES"),
);

/// A lightweight IoT edge gateway: devices in, durable store-and-forward, cloud MQTT out.
#[derive(Parser)]
#[command(
    name = "fieldgate",
    version = VERSION,
    about,
    long_about = "A lightweight IoT edge gateway: devices in, durable store-and-forward, \
        cloud MQTT out.\n\n\
        `run` serves the devices and the API; `check` validates a config without running it; \
        `devices` and `deadletter` manage a running gateway through its API (loopback only); \
        `rules test` runs a SQL rule offline on recorded events. \
        Every config key is described in docs/CONFIG.md. Logs go to stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (on the embedded default config unless --config is given).
    Run {
        /// Config file (TOML). Without it: TCP devices on 127.0.0.1:7000, API on
        /// 127.0.0.1:8080, events to ./data/sinks/local/*.ndjson and the console.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Reload the config whenever the --config file changes (as `kill -HUP` does).
        #[arg(long, requires = "config")]
        watch: bool,
    },
    /// Validate a config file and exit: 0 when valid, 1 with file, line and key otherwise.
    Check {
        /// Config file (TOML).
        file: PathBuf,
    },
    /// Print the embedded default config.
    DefaultConfig,
    /// Manage the devices of a running gateway over its API (needs `api.admin_token`).
    Devices(cli_devices::DevicesArgs),
    /// Inspect, replay or purge the events a sink's upstream refused for good.
    Deadletter(cli_deadletter::DeadLetterArgs),
    /// List and acknowledge the alarms of a running gateway (needs `api.admin_token`).
    Alarms(cli_alarms::AlarmArgs),
    /// Develop SQL rules: `rules test FILE --input events.ndjson` runs one offline.
    Rules(cli_rules::RulesArgs),
    /// Talk to a Modbus device directly, for commissioning (`modbus read`).
    #[cfg(feature = "modbus")]
    Modbus(cli_modbus::ModbusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file } => match config::load::<topology::Components>(&file) {
            Ok(config) => {
                println!(
                    "{}: ok ({} source(s), {} transform(s), {} sink(s))",
                    file.display(),
                    config.components.sources.len(),
                    config.components.transforms.len(),
                    config.components.sinks.len()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Devices(args) => cli_devices::run(args),
        Command::Deadletter(args) => cli_deadletter::run(args),
        Command::Alarms(args) => cli_alarms::run(args),
        Command::Rules(args) => cli_rules::run(args),
        #[cfg(feature = "modbus")]
        Command::Modbus(args) => cli_modbus::run(args),
        Command::DefaultConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Run {
            config: path,
            watch,
        } => {
            let loaded: Result<topology::Config, _> = match &path {
                Some(path) => config::load(path),
                None => config::parse("<embedded default>", config::DEFAULT_CONFIG, |var| {
                    std::env::var(var).ok()
                }),
            };
            let config = match loaded {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::FAILURE;
                }
            };
            telemetry::logging::init(&config.settings.log);
            if rustls::crypto::ring::default_provider()
                .install_default()
                .is_err()
            {
                tracing::debug!("a rustls crypto provider was already installed");
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("error: cannot start the async runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            let options = topology::RunOptions {
                config_path: path,
                watch,
            };
            let outcome = runtime.block_on(topology::run(config, options));
            // Everything that holds data has finished by now; do not wait for idle
            // blocking-pool threads or lingering API connections.
            runtime.shutdown_timeout(std::time::Duration::from_millis(200));
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
