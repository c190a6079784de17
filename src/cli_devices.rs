//! `fieldgate devices add|list|show|revoke`: the admin CLI, a client of a running gateway's
//! `/api/v1` routes, so it shares their validation and errors.
//!
//! Invariant: the admin token travels over plain HTTP, so the CLI talks only to loopback
//! addresses (use an SSH tunnel for a remote gateway).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt as _, Full};
use hyper::Method;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Environment variable holding the admin token when `--token` is not given.
pub const TOKEN_ENV: &str = "FIELDGATE_ADMIN_TOKEN";
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response the CLI reads.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// Help heading of the options every admin command shares (`devices`, `deadletter`).
pub(crate) const GATEWAY_HEADING: &str = "Gateway options (every subcommand)";

/// `fieldgate devices`.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Base URL of the gateway's API (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true, help_heading = GATEWAY_HEADING)]
    api: String,
    /// The gateway's admin token (`api.admin_token`), not a device's token; defaults to
    /// $FIELDGATE_ADMIN_TOKEN.
    #[arg(long, visible_alias = "admin-token", global = true, help_heading = GATEWAY_HEADING)]
    token: Option<String>,
    #[command(subcommand)]
    command: DevicesCommand,
}

/// What to do with devices.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Register a device and print its credentials (shown only this once).
    Add {
        /// Device id; derived from --mac/--imei, or random, when absent.
        #[arg(long)]
        id: Option<String>,
        /// Human-readable name.
        #[arg(long)]
        name: Option<String>,
        /// Device model.
        #[arg(long)]
        model: Option<String>,
        /// A label `KEY=VALUE` (or `KEY:VALUE`); repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// MAC address.
        #[arg(long)]
        mac: Option<String>,
        /// IMEI.
        #[arg(long)]
        imei: Option<String>,
        /// Ed25519 public key, base64 (the device then needs no secret).
        #[arg(long)]
        public_key: Option<String>,
    },
    /// List devices, one line each.
    List {
        /// Only devices with this status: online, offline or revoked.
        #[arg(long)]
        status: Option<String>,
        /// Only devices with this label, `KEY=VALUE` (or `KEY:VALUE`).
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
        label: Option<(String, String)>,
        /// Only devices of this model.
        #[arg(long)]
        model: Option<String>,
        /// Substring of id, name, MAC or IMEI.
        #[arg(long)]
        search: Option<String>,
        /// Page size (1..=1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Start after this cursor (printed at the end of the previous page).
        #[arg(long)]
        cursor: Option<String>,
        /// Print the raw JSON page.
        #[arg(long)]
        json: bool,
    },
    /// Print one device as JSON.
    Show {
        /// Device id.
        id: String,
    },
    /// Revoke a device: its credentials stop working and its sessions close.
    Revoke {
        /// Device id.
        id: String,
    },
}

/// Why a CLI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The gateway could not be reached.
    #[error("cannot reach the gateway at {api}: {source}")]
    Connect {
        /// The `--api` URL.
        api: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The gateway answered with an error.
    #[error("{status}: {detail} ({code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The problem's stable code.
        code: String,
        /// The problem's detail.
        detail: String,
    },
}

/// Runs `fieldgate devices …` and prints its outcome.
pub fn run(args: DevicesArgs) -> ExitCode {
    run_admin_command(execute(args))
}

/// Runs an admin CLI command on a small runtime; prints its output, or its error on stderr.
pub(crate) fn run_admin_command(
    command: impl std::future::Future<Output = Result<String, CliError>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The admin token: `--token`, else `$FIELDGATE_ADMIN_TOKEN`.
pub(crate) fn admin_token(token: Option<String>) -> Result<String, CliError> {
    token
        .or_else(|| std::env::var(TOKEN_ENV).ok())
        .filter(|token| !token.is_empty())
        .ok_or_else(|| CliError::Usage(format!("no admin token: pass --token or set {TOKEN_ENV}")))
}

/// Performs the command; answers what to print.
pub async fn execute(args: DevicesArgs) -> Result<String, CliError> {
    let token = admin_token(args.token)?;
    let client = Client::new(&args.api, token)?;
    match args.command {
        DevicesCommand::Add {
            id,
            name,
            model,
            labels,
            mac,
            imei,
            public_key,
        } => {
            let label_map: BTreeMap<String, String> = labels.into_iter().collect();
            let body = serde_json::json!({
                "id": id, "name": name, "model": model, "labels": label_map,
                "mac": mac, "imei": imei, "public_key": public_key,
            });
            let created = client
                .call(Method::POST, "/api/v1/devices", Some(&body))
                .await?;
            Ok(pretty(&created))
        }
        DevicesCommand::List {
            status,
            label,
            model,
            search,
            limit,
            cursor,
            json,
        } => {
            let mut query = String::new();
            let limit = limit.map(|limit| limit.to_string());
            // The API's query syntax is `label=KEY:VALUE`.
            let label = label.map(|(key, value)| format!("{key}:{value}"));
            for (key, value) in [
                ("status", status.as_deref()),
                ("label", label.as_deref()),
                ("model", model.as_deref()),
                ("search", search.as_deref()),
                ("limit", limit.as_deref()),
                ("cursor", cursor.as_deref()),
            ] {
                if let Some(value) = value {
                    query.push(if query.is_empty() { '?' } else { '&' });
                    query.push_str(key);
                    query.push('=');
                    query.push_str(&percent_encode(value));
                }
            }
            let page = client
                .call(Method::GET, &format!("/api/v1/devices{query}"), None)
                .await?;
            Ok(if json { pretty(&page) } else { table(&page) })
        }
        DevicesCommand::Show { id } => {
            let device = client
                .call(
                    Method::GET,
                    &format!("/api/v1/devices/{}", percent_encode(&id)),
                    None,
                )
                .await?;
            Ok(pretty(&device))
        }
        DevicesCommand::Revoke { id } => {
            let device = client
                .call(
                    Method::POST,
                    &format!("/api/v1/devices/{}/revoke", percent_encode(&id)),
                    None,
                )
                .await?;
            Ok(format!(
                "revoked {}\n",
                device["id"].as_str().unwrap_or(id.as_str())
            ))
        }
    }
}

/// A `--label` argument: `KEY=VALUE`, or `KEY:VALUE` as in the API's query. Label keys
/// hold neither `=` nor `:`, so the first of them ends the key; the value may hold both.
fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.find(['=', ':']) {
        Some(at) if at > 0 => Ok((text[..at].to_owned(), text[at + 1..].to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// One line per device, then the cursor of the next page if any.
fn table(page: &Value) -> String {
    let mut out = format!(
        "{:<40} {:<8} {:<24} {:<10} {}\n",
        "ID", "STATUS", "LAST SEEN (ms)", "MESSAGES", "NAME"
    );
    for device in page["devices"].as_array().into_iter().flatten() {
        let text = |key: &str| device[key].as_str().unwrap_or("-").to_owned();
        let number = |key: &str| device[key].as_u64().map_or("-".into(), |n| n.to_string());
        out.push_str(&format!(
            "{:<40} {:<8} {:<24} {:<10} {}\n",
            text("id"),
            text("status"),
            number("last_seen_ms"),
            number("messages"),
            text("name"),
        ));
    }
    let total = page["total"].as_u64().unwrap_or(0);
    out.push_str(&format!("{total} device(s)"));
    if let Some(cursor) = page["next_cursor"].as_str() {
        out.push_str(&format!("; next page: --cursor {cursor}"));
    }
    out.push('\n');
    out
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A tiny HTTP/1.1 client for one gateway: one connection per call.
pub(crate) struct Client {
    api: String,
    host: String,
    port: u16,
    prefix: String,
    token: String,
}

impl Client {
    /// A client of the API at `api` (loopback only) sending the admin `token`.
    pub(crate) fn new(api: &str, token: String) -> Result<Self, CliError> {
        let usage = |why: &str| CliError::Usage(format!("--api {api:?}: {why}"));
        let rest = api
            .strip_prefix("http://")
            .ok_or_else(|| usage("must start with http://"))?;
        let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                (host, port.parse::<u16>().map_err(|_| usage("bad port"))?)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(usage("no host"));
        }
        Ok(Self {
            api: api.to_owned(),
            host: host.to_owned(),
            port,
            prefix: match prefix.trim_matches('/') {
                "" => String::new(),
                prefix => format!("/{prefix}"),
            },
            token,
        })
    }

    fn connect_error(
        &self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> CliError {
        CliError::Connect {
            api: self.api.clone(),
            source: source.into(),
        }
    }

    /// Sends one request; answers the JSON body of a 2xx, or the problem as an error.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.call_once(method, path, body))
            .await
            .map_err(|_| self.connect_error("no answer within 30 s"))?
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let addresses: Vec<std::net::SocketAddr> =
            tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|err| self.connect_error(err))?
                .collect();
        if addresses.is_empty() || !addresses.iter().all(|address| address.ip().is_loopback()) {
            return Err(CliError::Usage(format!(
                "--api {:?}: only loopback addresses are allowed (the admin token is sent in clear)",
                self.api
            )));
        }
        let stream = tokio::net::TcpStream::connect(&addresses[..])
            .await
            .map_err(|err| self.connect_error(err))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|err| self.connect_error(err))?;
        let payload = body
            .map(|body| Bytes::from(serde_json::to_vec(body).unwrap_or_default()))
            .unwrap_or_default();
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(HOST, format!("{}:{}", self.host, self.port))
            .header(AUTHORIZATION, format!("Bearer {}", self.token));
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(payload))
            .map_err(|err| self.connect_error(err))?;
        let exchange = async {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        };
        // The connection future does the I/O; drive it until the exchange is done.
        let (status, bytes) = tokio::select! {
            exchange = exchange => exchange.map_err(|err| self.connect_error(err))?,
            closed = connection => {
                return Err(match closed {
                    Err(err) => self.connect_error(err),
                    Ok(()) => self.connect_error("connection closed before the answer"),
                });
            }
        };
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|err| self.connect_error(err))?
        };
        if status.is_success() {
            Ok(value)
        } else {
            Err(CliError::Api {
                status: status.as_u16(),
                code: value["code"].as_str().unwrap_or("unknown").to_owned(),
                detail: value["detail"].as_str().map_or_else(
                    || String::from_utf8_lossy(&bytes).into_owned(),
                    str::to_owned,
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_api_urls() {
        let client =
            Client::new("http://127.0.0.1:8080", "t".into()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (client.host.as_str(), client.port, client.prefix.as_str()),
            ("127.0.0.1", 8080, "")
        );
        let client =
            Client::new("http://[::1]:9/gw/", "t".into()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (client.host.as_str(), client.port, client.prefix.as_str()),
            ("::1", 9, "/gw")
        );
        let client = Client::new("http://localhost", "t".into()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(client.port, 80);
        assert!(Client::new("https://x", "t".into()).is_err());
        assert!(Client::new("http://x:notaport", "t".into()).is_err());
    }

    #[test]
    fn shared_options_are_apart_from_the_subcommand_own() {
        use clap::CommandFactory as _;

        /// `fieldgate devices` alone.
        #[derive(clap::Parser)]
        struct Devices {
            #[command(flatten)]
            args: DevicesArgs,
        }
        let mut command = Devices::command();
        // Propagates the global options to the subcommands, as parsing does.
        command.build();
        let help = command
            .find_subcommand_mut("add")
            .unwrap_or_else(|| panic!("no add"))
            .render_help()
            .to_string();
        let (own, shared) = help
            .split_once(GATEWAY_HEADING)
            .unwrap_or_else(|| panic!("no {GATEWAY_HEADING:?} heading:\n{help}"));
        assert!(
            own.contains("--label") && !own.contains("--token"),
            "{help}"
        );
        assert!(
            shared.contains("--api") && shared.contains("--token"),
            "{help}"
        );
        assert!(
            shared.contains("admin token") && shared.contains("--admin-token"),
            "{help}"
        );
    }

    #[test]
    fn labels_take_either_separator() {
        let pair = |key: &str, value: &str| Ok((key.to_owned(), value.to_owned()));
        assert_eq!(parse_label("site=north"), pair("site", "north"));
        assert_eq!(parse_label("site:north"), pair("site", "north"));
        assert_eq!(parse_label("url=http://x?a=b"), pair("url", "http://x?a=b"));
        assert_eq!(parse_label("empty="), pair("empty", ""));
        assert!(parse_label("north").is_err());
        assert!(parse_label("=north").is_err());
    }

    #[test]
    fn percent_encodes_reserved() {
        assert_eq!(percent_encode("a:b c/é"), "a%3Ab%20c%2F%C3%A9");
    }

    #[tokio::test]
    async fn refuses_non_loopback() {
        let client =
            Client::new("http://192.0.2.1:8080", "t".into()).unwrap_or_else(|e| panic!("{e}"));
        let err = client.call(Method::GET, "/", None).await.err();
        assert!(matches!(err, Some(CliError::Usage(_))), "{err:?}");
    }
}
