//! `fieldgate rules test FILE --input events.ndjson [--transform NAME]`: runs one SQL rule
//! of a gateway config offline on recorded events and prints what it emits, one JSON line
//! per output event, so rules can be developed without devices or a running gateway.
//!
//! Time comes from the recorded events (processing time = each event's `time`), so a run
//! is deterministic; time windows and sessions still open at the end are flushed.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use clap::{Args, Subcommand};
use fieldgate_core::{DeviceId, Event, EventKind, PayloadFormat};
use serde::Deserialize;
use serde_json::Value;

use crate::telemetry::Metrics;
use crate::transforms::sql::transform::{ERROR_REASONS, time_of};
use crate::transforms::{Emitted, EventTransform, TransformConfig, TransformServices};

/// Longest input line accepted, in bytes.
const MAX_LINE: usize = 1024 * 1024;

/// `fieldgate rules`.
#[derive(Debug, Args)]
pub struct RulesArgs {
    #[command(subcommand)]
    command: RulesCommand,
}

/// What to do with rules.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Run a `type = "sql"` transform of FILE on recorded events and print its outputs,
    /// one JSON line each ({"device","kind","time","payload"}, the input's format).
    Test {
        /// Gateway config (TOML) holding the rule.
        file: PathBuf,
        /// Recorded events, one JSON object per line: {"device": "d1", "kind":
        /// "telemetry", "time": "2024-05-01T12:00:00Z" or epoch ms, "payload": {...}};
        /// `-` reads standard input.
        #[arg(long, value_name = "EVENTS_NDJSON")]
        input: PathBuf,
        /// The sql transform to run; may be left out when FILE has only one.
        #[arg(long, value_name = "NAME")]
        transform: Option<String>,
        /// Start from the rule state saved by `--save` (replays a restart).
        #[arg(long, value_name = "STATE_FILE")]
        restore: Option<PathBuf>,
        /// At the end, save the rule's state to this file instead of flushing the windows
        /// still open.
        #[arg(long, value_name = "STATE_FILE")]
        save: Option<PathBuf>,
    },
}

/// One recorded input event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputEvent {
    device: String,
    #[serde(default = "telemetry")]
    kind: String,
    time: Value,
    #[serde(default = "empty_object")]
    payload: Value,
}

fn telemetry() -> String {
    "telemetry".to_owned()
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// Runs `fieldgate rules …`.
pub fn run(args: RulesArgs) -> ExitCode {
    match args.command {
        RulesCommand::Test {
            file,
            input,
            transform,
            restore,
            save,
        } => match test(
            &file,
            &input,
            transform.as_deref(),
            restore.as_deref(),
            save.as_deref(),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("error: {message}");
                ExitCode::FAILURE
            }
        },
    }
}

fn test(
    file: &std::path::Path,
    input: &std::path::Path,
    name: Option<&str>,
    restore: Option<&std::path::Path>,
    save: Option<&std::path::Path>,
) -> Result<(), String> {
    let config =
        crate::config::load::<crate::topology::Components>(file).map_err(|err| err.to_string())?;
    let rules: Vec<(&String, &crate::transforms::sql::SqlConfig)> = config
        .components
        .transforms
        .iter()
        .filter_map(|(name, transform)| match transform {
            TransformConfig::Sql(sql) => Some((name, sql)),
            _ => None,
        })
        .collect();
    let names: Vec<&str> = rules.iter().map(|(name, _)| name.as_str()).collect();
    let (name, rule) = match name {
        Some(wanted) => rules
            .iter()
            .find(|(name, _)| name.as_str() == wanted)
            .copied()
            .ok_or_else(|| {
                format!(
                    "{}: no sql transform named {wanted:?} (sql transforms: {names:?})",
                    file.display()
                )
            })?,
        None => match rules.as_slice() {
            [only] => *only,
            [] => return Err(format!("{}: no `type = \"sql\"` transform", file.display())),
            _ => {
                return Err(format!(
                    "{}: several sql transforms {names:?}: pick one with --transform NAME",
                    file.display()
                ));
            }
        },
    };
    let metrics = Arc::new(Metrics::new());
    let services = TransformServices {
        registry: None,
        metrics: metrics.clone(),
        alarms: Arc::default(),
        actions: None,
    };
    let transform = rule
        .build_sql(name, &services)
        .map_err(|err| err.to_string())?;
    let source: Arc<str> = Arc::from(transform.from());
    if let Some(state) = restore {
        let bytes = std::fs::read(state)
            .map_err(|err| format!("{}: cannot read: {err}", state.display()))?;
        transform
            .restore(&bytes)
            .map_err(|err| format!("{}: {err:#}", state.display()))?;
    }
    // Like the gateway's ticker, tick the rule as time passes: here, at each event's time.
    let ticks = transform.tick_interval().is_some();
    let reader: Box<dyn Read> = if input.as_os_str() == "-" {
        Box::new(io::stdin())
    } else {
        Box::new(
            File::open(input).map_err(|err| format!("{}: cannot open: {err}", input.display()))?,
        )
    };
    let mut reader = BufReader::new(reader);
    let stdout = io::stdout();
    let mut stdout = stdout.lock();
    let (mut read, mut written) = (0u64, 0u64);
    let mut line = Vec::new();
    let mut number = 0usize;
    loop {
        line.clear();
        number += 1;
        let at = |message: String| format!("{}:{number}: {message}", input.display());
        let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
        let count = reader
            .by_ref()
            .take(limit)
            .read_until(b'\n', &mut line)
            .map_err(|err| at(format!("cannot read: {err}")))?;
        if count == 0 {
            break;
        }
        if line.len() > MAX_LINE {
            return Err(at(format!("line longer than {MAX_LINE} bytes")));
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let event = parse_line(&line, &source).map_err(at)?;
        read += 1;
        let mut out = Emitted::default();
        if ticks {
            let now = SystemTime::UNIX_EPOCH + Duration::from_millis(event.received_at_ms);
            transform.tick(now, &mut out);
        }
        transform.apply(event, &mut out);
        written += print(&mut stdout, out)?;
    }
    match save {
        Some(state) => match transform.checkpoint() {
            Some(bytes) => std::fs::write(state, bytes)
                .map_err(|err| format!("{}: cannot write: {err}", state.display()))?,
            None => eprintln!("rule {name:?} has no window: no state to save"),
        },
        None => {
            let mut out = Emitted::default();
            transform.flush(&mut out);
            written += print(&mut stdout, out)?;
        }
    }
    let mut summary = format!("{read} event(s) in, {written} out");
    let filtered = metrics.filtered(name).get();
    if filtered > 0 {
        summary.push_str(&format!(", {filtered} filtered by WHERE"));
    }
    for reason in ERROR_REASONS {
        let count = metrics.transform_error(name, reason).get();
        if count > 0 {
            summary.push_str(&format!(", {count} {reason}"));
        }
    }
    eprintln!("{summary}");
    Ok(())
}

fn parse_line(line: &[u8], source: &Arc<str>) -> Result<Event, String> {
    let input: InputEvent =
        serde_json::from_slice(line).map_err(|err| format!("not an event: {err}"))?;
    if input.device.is_empty() {
        return Err("`device` is empty".to_owned());
    }
    let kind = EventKind::parse(&input.kind).ok_or_else(|| {
        format!(
            "unknown kind {:?}; kinds: telemetry, status, alarm, command_result, event",
            input.kind
        )
    })?;
    let time = time_of(&input.time)
        .and_then(|ms| u64::try_from(ms).ok())
        .ok_or_else(|| "`time` must be RFC 3339 or epoch milliseconds (>= 0)".to_owned())?;
    let payload = serde_json::to_vec(&input.payload).map_err(|err| err.to_string())?;
    Ok(Event::new(
        DeviceId::new(&input.device),
        kind,
        source.clone(),
        time,
        PayloadFormat::Json,
        Bytes::from(payload),
    ))
}

fn print(out: &mut impl Write, emitted: Emitted) -> Result<u64, String> {
    let mut count = 0;
    for (_, event) in emitted.into_events() {
        let payload = match event.format {
            PayloadFormat::Json => serde_json::from_slice(&event.payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&event.payload).into())),
            PayloadFormat::Binary => Value::Null,
        };
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(event.received_at_ms);
        let line = serde_json::json!({
            "device": event.device.as_str(),
            "kind": event.kind.as_str(),
            "time": humantime::format_rfc3339_millis(time).to_string(),
            "payload": payload,
        });
        writeln!(out, "{line}").map_err(|err| format!("cannot write the output: {err}"))?;
        count += 1;
    }
    Ok(count)
}
