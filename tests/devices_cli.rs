//! `fieldgate devices add|list|show|revoke` against a running gateway, and HTTP telemetry
//! from a device registered that way landing in a file sink.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{Gateway, eventually, fieldgate_bin, free_port};
use serde_json::Value;

const ADMIN: &str = "cli-admin-token";

fn config(api_port: u16) -> String {
    format!(
        "[gateway]\nid = \"gw-cli\"\n\n[api]\naddress = \"127.0.0.1:{api_port}\"\n\
         admin_token = \"{ADMIN}\"\n\n[registry]\n\n\
         [sinks.local]\ntype = \"file\"\ninputs = [\"http\"]\n\
         [sinks.local.buffer]\nfsync = \"always\"\n"
    )
}

async fn cli(gateway: &Gateway, args: &[&str], token: Option<&str>) -> Output {
    let mut command = Command::new(fieldgate_bin());
    command
        .arg("devices")
        .args(["--api", &format!("http://{}", gateway.api)])
        .args(args)
        .env_remove("FIELDGATE_ADMIN_TOKEN");
    if let Some(token) = token {
        command.env("FIELDGATE_ADMIN_TOKEN", token);
    }
    tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap_or_else(|err| panic!("{err}"))
        .unwrap_or_else(|err| panic!("cannot run fieldgate devices: {err}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_cli_round_trip_and_http_ingestion() {
    let gateway = Gateway::start(&config(free_port())).await;

    let added = cli(
        &gateway,
        &[
            "add",
            "--id",
            "meter-7",
            "--name",
            "Meter",
            "--label",
            "site=north",
        ],
        Some(ADMIN),
    )
    .await;
    assert!(added.status.success(), "{}", text(&added));
    let provisioned: Value = serde_json::from_slice(&added.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", text(&added)));
    assert_eq!(provisioned["device"]["id"], "meter-7");
    let jwt = provisioned["tokens"]["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {provisioned}"))
        .to_owned();

    let duplicate = cli(&gateway, &["add", "--id", "meter-7"], Some(ADMIN)).await;
    assert!(!duplicate.status.success());
    assert!(
        text(&duplicate).contains("conflict"),
        "{}",
        text(&duplicate)
    );

    // Labels are KEY=VALUE in every command; the API's KEY:VALUE works too.
    for label in ["site=north", "site:north"] {
        let listed = cli(&gateway, &["list", "--label", label], Some(ADMIN)).await;
        assert!(listed.status.success(), "{label}: {}", text(&listed));
        assert!(
            text(&listed).contains("meter-7"),
            "{label}: {}",
            text(&listed)
        );
        assert!(
            text(&listed).contains("1 device(s)"),
            "{label}: {}",
            text(&listed)
        );
    }
    let other = cli(&gateway, &["list", "--label", "site=south"], Some(ADMIN)).await;
    assert!(text(&other).contains("0 device(s)"), "{}", text(&other));

    let shown = cli(&gateway, &["show", "meter-7", "--token", ADMIN], None).await;
    assert!(shown.status.success(), "{}", text(&shown));
    let device: Value = serde_json::from_slice(&shown.stdout).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(device["labels"]["site"], "north");

    let missing = cli(&gateway, &["show", "nobody"], Some(ADMIN)).await;
    assert!(!missing.status.success());
    assert!(text(&missing).contains("not_found"), "{}", text(&missing));

    let unauthorized = cli(&gateway, &["list"], Some("wrong")).await;
    assert!(!unauthorized.status.success());
    assert!(
        text(&unauthorized).contains("bad_admin_token"),
        "{}",
        text(&unauthorized)
    );
    let no_token = cli(&gateway, &["list"], None).await;
    assert!(!no_token.status.success());
    assert!(
        text(&no_token).contains("FIELDGATE_ADMIN_TOKEN"),
        "{}",
        text(&no_token)
    );

    // The device posts telemetry; it lands in the file sink.
    let body = r#"[{"temp":21.5},{"kind":"alarm","code":"hot"}]"#;
    let request = format!(
        "POST /api/v1/devices/meter-7/telemetry HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {jwt}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = raw_http(gateway.api, &request).await;
    assert!(response.starts_with("HTTP/1.0 202"), "{response}");
    assert!(response.ends_with(r#"{"accepted":2}"#), "{response}");
    let sink_dir = gateway.data_dir.join("sinks").join("local");
    let written = eventually(Duration::from_secs(10), || {
        let mut all = String::new();
        for entry in std::fs::read_dir(&sink_dir).ok()?.flatten() {
            all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
        (all.contains("21.5") && all.contains("hot")).then_some(all)
    })
    .await;
    assert!(written.is_some(), "telemetry not in {}", sink_dir.display());

    let revoked = cli(&gateway, &["revoke", "meter-7"], Some(ADMIN)).await;
    assert!(revoked.status.success(), "{}", text(&revoked));
    assert_eq!(
        String::from_utf8_lossy(&revoked.stdout),
        "revoked meter-7\n"
    );
    let refused = raw_http(gateway.api, &request).await;
    assert!(refused.starts_with("HTTP/1.0 403"), "{refused}");
}

async fn raw_http(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .unwrap_or_else(|_| panic!("no HTTP answer"))
        .unwrap_or_else(|err| panic!("{err}"));
    String::from_utf8_lossy(&response).into_owned()
}
