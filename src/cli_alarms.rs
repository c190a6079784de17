//! `fieldgate alarms list|ack`: the alarms of a running gateway's alarm transforms,
//! through its `/api/v1/alarms` routes (loopback only, admin token required, like
//! `fieldgate devices`).

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::Value;

use crate::cli_devices::{
    CliError, Client, GATEWAY_HEADING, admin_token, percent_encode, run_admin_command,
};

/// `fieldgate alarms`.
#[derive(Debug, Args)]
pub struct AlarmArgs {
    /// Base URL of the gateway's API (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true, help_heading = GATEWAY_HEADING)]
    api: String,
    /// The gateway's admin token (`api.admin_token`); defaults to $FIELDGATE_ADMIN_TOKEN.
    #[arg(long, visible_alias = "admin-token", global = true, help_heading = GATEWAY_HEADING)]
    token: Option<String>,
    #[command(subcommand)]
    command: AlarmCommand,
}

/// What to do with alarms.
#[derive(Debug, Subcommand)]
pub enum AlarmCommand {
    /// List alarms, one line each.
    List {
        /// Only alarms in this state: raised, acknowledged, cleared or active.
        #[arg(long)]
        state: Option<String>,
        /// Only this device's alarms.
        #[arg(long)]
        device: Option<String>,
        /// Only this rule's (alarm transform's) alarms.
        #[arg(long)]
        rule: Option<String>,
        /// Print the raw JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge the raised alarm of a rule for a device.
    Ack {
        /// The rule: the alarm transform's name.
        rule: String,
        /// Device id.
        device: String,
    },
}

/// Runs `fieldgate alarms …` and prints its outcome.
pub fn run(args: AlarmArgs) -> ExitCode {
    run_admin_command(execute(args))
}

async fn execute(args: AlarmArgs) -> Result<String, CliError> {
    let token = admin_token(args.token)?;
    let client = Client::new(&args.api, token)?;
    match args.command {
        AlarmCommand::List {
            state,
            device,
            rule,
            json,
        } => {
            let query: Vec<String> = [("state", state), ("device", device), ("rule", rule)]
                .into_iter()
                .filter_map(|(key, value)| Some(format!("{key}={}", percent_encode(&value?))))
                .collect();
            let path = if query.is_empty() {
                "/api/v1/alarms".to_owned()
            } else {
                format!("/api/v1/alarms?{}", query.join("&"))
            };
            let listing = client.call(Method::GET, &path, None).await?;
            if json {
                return Ok(format!("{listing:#}\n"));
            }
            Ok(table(&listing))
        }
        AlarmCommand::Ack { rule, device } => {
            let path = format!(
                "/api/v1/alarms/{}/{}/ack",
                percent_encode(&rule),
                percent_encode(&device)
            );
            let alarm = client.call(Method::POST, &path, None).await?;
            Ok(format!(
                "acknowledged: {} {} ({})\n",
                alarm["rule"].as_str().unwrap_or_default(),
                alarm["device"].as_str().unwrap_or_default(),
                alarm["severity"].as_str().unwrap_or_default()
            ))
        }
    }
}

fn table(listing: &Value) -> String {
    let mut out = String::new();
    let alarms = listing["alarms"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let _written = writeln!(out, "{} alarm(s)", listing["total"]);
    if alarms.is_empty() {
        return out;
    }
    let _written = writeln!(
        out,
        "{:<20} {:<24} {:<13} {:<9} {:<15} {:>12} {:>12} {:>14}",
        "RULE", "DEVICE", "STATE", "SEVERITY", "DETECTOR", "VALUE", "THRESHOLD", "SINCE"
    );
    let number = |value: &Value| {
        value
            .as_f64()
            .map_or_else(|| "-".to_owned(), |n| format!("{n}"))
    };
    for alarm in alarms {
        let _written = writeln!(
            out,
            "{:<20} {:<24} {:<13} {:<9} {:<15} {:>12} {:>12} {:>14}",
            alarm["rule"].as_str().unwrap_or_default(),
            alarm["device"].as_str().unwrap_or_default(),
            alarm["state"].as_str().unwrap_or_default(),
            alarm["severity"].as_str().unwrap_or_default(),
            alarm["detector"].as_str().unwrap_or_default(),
            number(&alarm["value"]),
            number(&alarm["threshold"]),
            alarm["since"],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_one_line_per_alarm() {
        let listing = serde_json::json!({"total": 1, "alarms": [{
            "rule": "overheat", "device": "dev-1", "state": "raised", "severity": "major",
            "detector": "threshold", "value": 85.5, "threshold": 80.0, "since": 1000
        }]});
        let text = table(&listing);
        assert!(text.starts_with("1 alarm(s)\n"));
        let line = text.lines().nth(2).expect("a row");
        for part in ["overheat", "dev-1", "raised", "major", "85.5", "80", "1000"] {
            assert!(line.contains(part), "{line}");
        }
        assert_eq!(
            table(&serde_json::json!({"total": 0, "alarms": []})),
            "0 alarm(s)\n"
        );
    }
}
