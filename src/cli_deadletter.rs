//! `fieldgate deadletter list|replay|purge SINK`: inspect and resend the events a sink's
//! upstream refused for good, through a running gateway's `/api/v1/deadletter` routes
//! (loopback only, admin token required, like `fieldgate devices`).

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::Value;

use crate::cli_devices::{CliError, Client, GATEWAY_HEADING, admin_token, run_admin_command};

/// `fieldgate deadletter`.
#[derive(Debug, Args)]
pub struct DeadLetterArgs {
    /// Base URL of the gateway's API (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true, help_heading = GATEWAY_HEADING)]
    api: String,
    /// The gateway's admin token (`api.admin_token`); defaults to $FIELDGATE_ADMIN_TOKEN.
    #[arg(long, visible_alias = "admin-token", global = true, help_heading = GATEWAY_HEADING)]
    token: Option<String>,
    #[command(subcommand)]
    command: DeadLetterCommand,
}

/// What to do with a sink's dead letters.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List the refused events, oldest first.
    List {
        /// Sink name.
        sink: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the raw JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Move the refused events back into the sink's buffer (after fixing the cause).
    Replay {
        /// Sink name.
        sink: String,
    },
    /// Delete the refused events for good.
    Purge {
        /// Sink name.
        sink: String,
    },
}

/// Runs `fieldgate deadletter …` and prints its outcome.
pub fn run(args: DeadLetterArgs) -> ExitCode {
    run_admin_command(execute(args))
}

async fn execute(args: DeadLetterArgs) -> Result<String, CliError> {
    let token = admin_token(args.token)?;
    let client = Client::new(&args.api, token)?;
    match args.command {
        DeadLetterCommand::List { sink, limit, json } => {
            let path = format!("/api/v1/deadletter/{}?limit={limit}", path_segment(&sink)?);
            let listing = client.call(Method::GET, &path, None).await?;
            if json {
                return Ok(format!("{listing:#}\n"));
            }
            Ok(table(&listing))
        }
        DeadLetterCommand::Replay { sink } => {
            let path = format!("/api/v1/deadletter/{}/replay", path_segment(&sink)?);
            let answer = client.call(Method::POST, &path, None).await?;
            Ok(format!(
                "replayed {} event(s) into the buffer of `{sink}`; {} left\n",
                answer["count"], answer["remaining"]
            ))
        }
        DeadLetterCommand::Purge { sink } => {
            let path = format!("/api/v1/deadletter/{}", path_segment(&sink)?);
            let answer = client.call(Method::DELETE, &path, None).await?;
            Ok(format!(
                "purged {} event(s) of `{sink}`; {} left\n",
                answer["count"], answer["remaining"]
            ))
        }
    }
}

/// Sink names are config keys; anything that would need escaping is not one.
fn path_segment(sink: &str) -> Result<&str, CliError> {
    if !sink.is_empty()
        && sink
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
    {
        Ok(sink)
    } else {
        Err(CliError::Usage(format!(
            "{sink:?} is not a sink name (letters, digits, `_`, `-`, `.`)"
        )))
    }
}

fn table(listing: &Value) -> String {
    let mut out = String::new();
    let entries = listing["entries"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let _written = writeln!(
        out,
        "{} dead-lettered event(s) in `{}`",
        listing["total"],
        listing["sink"].as_str().unwrap_or_default()
    );
    if entries.is_empty() {
        return out;
    }
    let _written = writeln!(
        out,
        "{:>6}  {:<10}  {:<6}  {:<24}  {:<14}  {:>8}",
        "ID", "REASON", "CODE", "DEVICE", "KIND", "BYTES"
    );
    for entry in entries {
        let code = entry["reason_code"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |code| format!("{code:#04x}"));
        let _written = writeln!(
            out,
            "{:>6}  {:<10}  {:<6}  {:<24}  {:<14}  {:>8}",
            entry["id"],
            entry["reason"].as_str().unwrap_or_default(),
            code,
            entry["device"].as_str().unwrap_or_default(),
            entry["kind"].as_str().unwrap_or_default(),
            entry["size"],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_names_are_plain_path_segments() {
        assert!(path_segment("cloud-1_a.b").is_ok());
        for bad in ["", "../x", "a/b", "a?b", "a b", "%2e"] {
            assert!(path_segment(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_table_shows_reason_and_code() {
        let listing = serde_json::json!({
            "sink": "cloud", "total": 1,
            "entries": [{"id": 0, "reason": "rejected", "reason_code": 135, "device": "dev-1",
                         "kind": "telemetry", "size": 12}]
        });
        let text = table(&listing);
        assert!(text.contains("1 dead-lettered event(s) in `cloud`"));
        assert!(text.contains("rejected") && text.contains("0x87") && text.contains("dev-1"));
    }
}
