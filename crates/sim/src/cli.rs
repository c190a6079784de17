//! Command-line interface: subcommands and their options.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::framing::Framing;
use crate::net::TlsArgs;

/// Simulated devices and load for a fieldgate gateway (or an MQTT broker).
#[derive(Debug, Parser)]
#[command(
    name = "fieldgate-sim",
    version,
    about = "Device simulator and load generator for fieldgate",
    long_about = "Device simulator and load generator for fieldgate.\n\n\
        Every run is bounded in count and time and prints a JSON summary on stdout; a progress \
        line goes to stderr once per second when it is a terminal. Targets must be loopback \
        addresses unless --allow-remote is given.\n\n\
        Many connections need many file descriptors: raise the limit first (`ulimit -n 65536`), \
        for this tool and for the gateway or broker under test."
)]
pub struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Scenarios.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Simulate N devices sending JSON over TCP to a gateway source (lines or length-prefixed, optional ack mode).
    #[command(after_help = RUN_SUMMARY_HELP)]
    Tcp(TcpArgs),
    /// Simulate N devices publishing over MQTT (to measure a broker, e.g. Mosquitto, as a peer).
    #[command(
        after_help = RUN_SUMMARY_HELP,
        mut_arg("rate", |arg| arg.help(
            "Messages per second per device; 0 = as fast as possible (at QoS 1 and 2 bounded by --window)"
        )),
        mut_arg("window", |arg| arg.help(
            "Most QoS 1 and 2 publishes per device awaiting PUBACK/PUBCOMP"
        )),
    )]
    Mqtt(MqttArgs),
    /// Open N TCP connections and hold them (RSS per idle connection).
    #[command(after_help = IDLE_SUMMARY_HELP)]
    Idle(IdleArgs),
    /// Connect and disconnect as fast as possible (connect churn); reports connects per second.
    #[command(after_help = STORM_SUMMARY_HELP)]
    Storm(StormArgs),
}

/// The fields of the tcp and mqtt summary (`stats::Summary`), for `--help` and the README.
pub const RUN_SUMMARY_HELP: &str = "\
Summary (JSON on stdout; the fields marked * need --subscribe and are null without it):
  scenario          \"tcp\" or \"mqtt\"
  devices           simulated devices
  sent              distinct messages sent (first transmissions): exactly devices × rate ×
                    duration when rate × duration is a whole number (or --messages per
                    device); fewer only when a device fell more than 1 s behind its schedule
                    because the target could not keep up
  acked             messages acknowledged: gateway acks (tcp --ack) or PUBACK/PUBCOMP
                    (mqtt at QoS 1 and 2); null when nothing is acknowledged
  received *        distinct messages of this run that arrived at the subscriber
  lost *            sent but never received; with drain_timed_out also those still queued
                    upstream (e.g. in the gateway's buffer)
  duplicates *      redeliveries of a message already received (at-least-once)
  connect_failures  failed connection attempts
  duration_s        seconds from the run start to the last send
  send_rate         sent / duration_s
  receive_rate *    received / seconds from the run start to the last new arrival
  latency_us *      send-to-arrival latency in microseconds: p50, p90, p99, p999, max
  resent            retransmissions after a reconnect (not counted in sent)
  nacked            messages the gateway refused with a nack (tcp --ack)
  disconnects       established connections that were lost
  stale *           arrivals stamped before this run started (an earlier run's backlog,
                    retained messages); ignored
  foreign *         arrivals for device ids outside PREFIX-1..=PREFIX-N; ignored
  unexpected *      arrivals with a seq the device never sent
  unrecognized *    arrivals without device, seq and send time: the gateway's status events
                    (each device's online and offline, the gateway's own status) and any
                    other traffic on --sub-topic; ignored
  drain_s *         seconds spent waiting for stragglers after sending
  drain_timed_out * true when --drain-timeout ended that wait
  errors            the first error of each kind and how many there were";

/// How idle works, and the fields of its summary (`idle::IdleSummary`).
pub const IDLE_SUMMARY_HELP: &str = "\
Each connection (optionally sending a hello or one message) is held for --hold. Each is a
file descriptor here and in the gateway: raise RLIMIT_NOFILE first (`ulimit -n 65536`). If
it runs out (EMFILE) the tool says so at once and the summary counts the failed connections.

Summary (JSON on stdout):
  scenario          \"idle\"
  devices           connections requested
  connected         connections still open at the end of the hold
  peak_connected    most connections open at once
  connect_failures  failed connection attempts
  closed_by_peer    connections the gateway closed during the hold
  connect_s         seconds to open every connection
  hold_s            seconds held
  errors            the first error of each kind and how many there were";

/// The fields of the storm summary (`storm::StormSummary`).
pub const STORM_SUMMARY_HELP: &str = "\
Summary (JSON on stdout):
  scenario          \"storm\"
  concurrency       connections in flight at once
  connects          accepted connections (welcomed, with --hello)
  connect_failures  failed attempts (refused, timed out, no welcome)
  duration_s        seconds stormed
  connects_per_s    connects / duration_s
  connect_us        time to establish an accepted connection (TCP, TLS, welcome) in
                    microseconds: p50, p90, p99, p999, max; values near 1 s or 3 s are SYN
                    retransmits after the listener's accept queue overflowed
  errors            the first error of each kind and how many there were";

/// Parses "5" (seconds), "1.5", "500ms", "2m", "1h 30m".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"));
    }
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (e.g. 30, 500ms, 2m)"))
}

/// Device-id prefixes must need no JSON escaping and must not be empty.
fn parse_prefix(text: &str) -> Result<String, String> {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        Ok(text.to_owned())
    } else {
        Err("use letters, digits, '-', '_', '.', ':'".to_owned())
    }
}

/// A fraction in 0..=1.
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("expected a number between 0 and 1".to_owned()),
    }
}

/// A finite rate >= 0.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err("expected a number >= 0".to_owned()),
    }
}

/// The behaviour of the simulated devices (tcp and mqtt).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Devices")]
pub struct DeviceArgs {
    /// Number of devices (one connection each).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub devices: u32,
    /// Device ids are PREFIX-1 ..= PREFIX-N (N = --devices).
    #[arg(long, default_value = "dev", value_parser = parse_prefix)]
    pub prefix: String,
    /// Messages per second per device; 0 = as fast as possible (bounded by --window in ack mode).
    #[arg(long, default_value = "1", value_parser = parse_rate)]
    pub rate: f64,
    /// Messages per device, then stop (default: unlimited within --duration).
    #[arg(long)]
    pub messages: Option<u64>,
    /// How long each device sends (default 10s; 10m when --messages is given). Bare numbers are seconds.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// New connections per second (0 = all at once).
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    pub ramp: f64,
    /// Random send-time jitter as a fraction of the send interval (0..1).
    #[arg(long, default_value = "0", value_parser = parse_fraction)]
    pub jitter: f64,
    /// Most unacknowledged messages per device (ack mode, MQTT QoS 1/2 inflight).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub window: u16,
    /// Pad each payload with a "pad" field to this many bytes (0 = no padding).
    #[arg(long, default_value_t = 75)]
    pub payload_size: usize,
    /// Payload template; placeholders {device} {seq} {send_us} {send_ms} {walk} {rand}.
    #[arg(long, default_value = crate::template::DEFAULT_TEMPLATE)]
    pub template: String,
}

/// The upstream subscriber that measures delivery (tcp and mqtt).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Measuring at a broker")]
pub struct SubscribeArgs {
    /// Subscribe to this broker and measure loss, duplicates and latency (mqtt:// or mqtts://).
    #[arg(long, value_name = "URL")]
    pub subscribe: Option<String>,
    /// Topic filter for the subscriber (QoS 1).
    #[arg(long, default_value = "gateways/#")]
    pub sub_topic: String,
    /// After sending, wait at most this long for every message to arrive upstream.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// Where and how to connect over TCP (tcp, idle, storm).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Target")]
pub struct TargetArgs {
    /// Gateway TCP source address.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub target: String,
    /// Wire framing of the source: lines or length_prefixed.
    #[arg(long, value_enum, default_value = "lines", hide_possible_values = true)]
    pub framing: Framing,
    /// Send {"type":"hello","device":ID[,"token":T]} first on every connection.
    #[arg(long)]
    pub hello: bool,
    /// The devices' token for the hello, as in the source's `tokens` (implies --hello).
    #[arg(long)]
    pub token: Option<String>,
    /// JSON object mapping device id -> token: each hello carries its device's own token
    /// (implies --hello). tcp/idle need a token for every PREFIX-N; storm cycles through the file's devices.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub tokens: Option<PathBuf>,
    /// Connect with TLS.
    #[arg(long)]
    pub tls: bool,
    /// Allow a non-loopback target.
    #[arg(long)]
    pub allow_remote: bool,
    /// TLS options (a flattened group sets the help heading of what follows: keep it last).
    #[command(flatten)]
    pub tls_args: TlsArgs,
}

impl TargetArgs {
    /// True when a hello is sent.
    pub fn sends_hello(&self) -> bool {
        self.hello || self.token.is_some() || self.tokens.is_some()
    }

    /// TLS options when --tls is on.
    pub fn tls(&self) -> Option<&TlsArgs> {
        self.tls.then_some(&self.tls_args)
    }
}

/// `tcp` options.
#[derive(Debug, Clone, Args)]
pub struct TcpArgs {
    /// Ack mode: expect {"type":"ack","seq":N}, keep unacked messages, resend them after a reconnect.
    #[arg(long)]
    pub ack: bool,
    /// Target and framing.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Device behaviour.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Upstream measurement.
    #[command(flatten)]
    pub subscribe: SubscribeArgs,
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    #[value(name = "3.1.1", alias = "4")]
    V311,
    /// MQTT 5.0.
    #[value(name = "5", alias = "5.0")]
    V5,
}

/// `mqtt` options.
#[derive(Debug, Clone, Args)]
pub struct MqttArgs {
    /// Broker URL (mqtt://[user:pass@]host:port or mqtts://...).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub url: String,
    /// Topic template; {device} is replaced by the device id.
    #[arg(long, default_value = "devices/{device}/telemetry")]
    pub topic: String,
    /// Publish QoS.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// MQTT protocol version of the devices: 3.1.1 or 5.
    #[arg(long, value_enum, default_value = "3.1.1", hide_possible_values = true)]
    pub protocol: MqttProtocol,
    /// Allow a non-loopback broker.
    #[arg(long)]
    pub allow_remote: bool,
    /// TLS options for mqtts:// (devices and subscriber).
    #[command(flatten)]
    pub tls_args: TlsArgs,
    /// Device behaviour.
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Upstream measurement.
    #[command(flatten)]
    pub subscribe: SubscribeArgs,
}

/// `idle` options.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Number of connections.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub devices: u32,
    /// Device ids are PREFIX-1, PREFIX-2, ...
    #[arg(long, default_value = "dev", value_parser = parse_prefix)]
    pub prefix: String,
    /// Send one telemetry message per connection after connecting (and the hello, if any).
    #[arg(long)]
    pub message: bool,
    /// How long to hold the connections once all are open. Bare numbers are seconds.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub hold: Duration,
    /// New connections per second (0 = as fast as possible).
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    pub ramp: f64,
    /// Send {"type":"heartbeat"} this often while holding (keeps the gateway's heartbeat timeout away).
    #[arg(long, value_parser = parse_duration)]
    pub heartbeat: Option<Duration>,
    /// Target and framing (a flattened group sets the help heading of what follows: keep it last).
    #[command(flatten)]
    pub target: TargetArgs,
}

/// `storm` options.
#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    /// How long to storm. Bare numbers are seconds.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// Device ids are PREFIX-1, PREFIX-2, ... (used in hellos; with --tokens, the file's ids instead).
    #[arg(long, default_value = "dev", value_parser = parse_prefix)]
    pub prefix: String,
    /// Target and framing (a flattened group sets the help heading of what follows: keep it last).
    #[command(flatten)]
    pub target: TargetArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every field of `summary` is explained in `help` and named in the README.
    fn documented(help: &str, summary: &impl serde::Serialize) {
        let readme = include_str!("../../../README.md");
        let value = serde_json::to_value(summary).unwrap();
        for key in value.as_object().unwrap().keys() {
            assert!(
                help.lines()
                    .any(|line| line.trim_start().starts_with(&format!("{key} "))),
                "summary field {key} is not explained in --help:\n{help}"
            );
            assert!(
                readme.contains(&format!("`{key}`")),
                "summary field {key} is not explained in README.md"
            );
        }
    }

    #[test]
    fn every_summary_field_is_explained() {
        let run = crate::stats::Summary {
            scenario: "tcp",
            devices: 1,
            sent: 0,
            acked: None,
            received: None,
            lost: None,
            duplicates: None,
            connect_failures: 0,
            duration_s: 0.0,
            send_rate: 0.0,
            receive_rate: None,
            latency_us: None,
            resent: 0,
            nacked: 0,
            disconnects: 0,
            stale: None,
            foreign: None,
            unexpected: None,
            unrecognized: None,
            drain_s: None,
            drain_timed_out: None,
            errors: Default::default(),
        };
        documented(RUN_SUMMARY_HELP, &run);
        let idle = crate::idle::IdleSummary {
            scenario: "idle",
            devices: 1,
            connected: 0,
            peak_connected: 0,
            connect_failures: 0,
            closed_by_peer: 0,
            connect_s: 0.0,
            hold_s: 0.0,
            errors: Default::default(),
        };
        documented(IDLE_SUMMARY_HELP, &idle);
        let storm = crate::storm::StormSummary {
            scenario: "storm",
            concurrency: 1,
            connects: 0,
            connect_failures: 0,
            duration_s: 0.0,
            connects_per_s: 0.0,
            connect_us: None,
            errors: Default::default(),
        };
        documented(STORM_SUMMARY_HELP, &storm);
    }

    #[test]
    fn mqtt_help_does_not_mention_ack_mode() {
        let mut command = Cli::command();
        let mqtt = command
            .find_subcommand_mut("mqtt")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(!mqtt.contains("ack mode"), "{mqtt}");
        assert!(mqtt.contains("unrecognized"), "{mqtt}");
    }

    #[test]
    fn durations_accept_bare_seconds_and_units() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn example_command_lines_parse() {
        let cli = Cli::try_parse_from([
            "fieldgate-sim",
            "mqtt",
            "--devices",
            "100",
            "--rate",
            "10",
            "--duration",
            "5",
            "--subscribe",
            "mqtt://127.0.0.1:1883",
            "--sub-topic",
            "devices/#",
            "--protocol",
            "5",
        ])
        .unwrap();
        let Command::Mqtt(args) = cli.command else {
            panic!("not mqtt")
        };
        assert_eq!(args.device.devices, 100);
        assert_eq!(args.protocol, MqttProtocol::V5);
        let cli = Cli::try_parse_from([
            "fieldgate-sim",
            "tcp",
            "--framing",
            "length_prefixed",
            "--ack",
            "--token",
            "t",
        ])
        .unwrap();
        let Command::Tcp(args) = cli.command else {
            panic!("not tcp")
        };
        assert!(args.target.sends_hello() && args.ack);
        assert_eq!(args.target.framing, Framing::LengthPrefixed);
        assert!(Cli::try_parse_from(["fieldgate-sim", "tcp", "--prefix", "a\"b"]).is_err());
    }
}
