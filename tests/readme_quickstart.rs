//! The README's quick start, run as written: the gateway on its embedded default config in
//! an empty working directory, the README's reading sent over TCP as `nc -q1` sends it,
//! then the file, the gateway's stdout and the metric compared with what the README shows.
//! It also checks the logs a user sees: no colour codes when stderr is not a terminal, and
//! values rather than Rust's debug forms (`Some(...)`).
//!
//! The default config listens on fixed ports (7000, 8080), which tests must not: the test
//! runs `fieldgate default-config` with only those two port numbers replaced by free ones,
//! after checking that they are the ports the README talks to.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{WAIT, eventually, fieldgate_bin, free_port, http_get};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long `nc -q1` waits for the peer after the end of its input: one second.
const NC_QUIT_AFTER: Duration = Duration::from_secs(1);

/// What the README's quick start says to do and what it shows.
#[derive(Debug)]
struct QuickStart {
    /// The reading piped into `nc`.
    reading: String,
    /// Where `nc` sends it.
    device_address: String,
    /// The file `cat` shows, relative to the working directory.
    file: PathBuf,
    /// Where `curl` scrapes `/metrics`.
    api_address: String,
    /// The metric `grep` picks.
    metric: String,
    /// The lines the README shows for the file, in order.
    lines: Vec<Value>,
    /// The metric line the README shows.
    metric_line: String,
}

/// The text between the README's `## Quick start` heading and the next `## `.
fn quick_start_section(readme: &str) -> &str {
    let start = readme
        .find("## Quick start")
        .unwrap_or_else(|| panic!("README.md has no `## Quick start` section"));
    let rest = &readme[start + 3..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// The fenced code blocks of `text`: (info string, body).
fn code_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        match (line.strip_prefix("```"), current.take()) {
            (Some(info), None) => current = Some((info.trim().to_owned(), String::new())),
            (Some(_), Some(block)) => blocks.push(block),
            (None, Some((info, mut body))) => {
                body.push_str(line);
                body.push('\n');
                current = Some((info, body));
            }
            (None, None) => {}
        }
    }
    blocks
}

fn parse_quick_start(readme: &str) -> QuickStart {
    let section = quick_start_section(readme);
    let line_starting = |prefix: &str| {
        section
            .lines()
            .map(str::trim)
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("README quick start: no line starting with {prefix:?}"))
    };
    let echo = line_starting("echo '");
    let reading = echo["echo '".len()..]
        .split('\'')
        .next()
        .unwrap_or_default()
        .to_owned();
    let nc = echo
        .split("nc -q1 ")
        .nth(1)
        .unwrap_or_else(|| panic!("README: `{echo}` does not pipe into `nc -q1`"));
    let mut nc = nc.split_whitespace();
    let device_address = format!(
        "{}:{}",
        nc.next().unwrap_or_default(),
        nc.next().unwrap_or_default()
    );
    let file = PathBuf::from(
        line_starting("cat ")
            .split_whitespace()
            .nth(1)
            .unwrap_or_default(),
    );
    let curl = line_starting("curl -s ");
    let url = curl.split_whitespace().nth(2).unwrap_or_default();
    let api_address = url
        .strip_suffix("/metrics")
        .unwrap_or_else(|| panic!("README: `{curl}` does not scrape /metrics"))
        .to_owned();
    let metric = curl
        .split("grep ")
        .nth(1)
        .unwrap_or_else(|| panic!("README: `{curl}` does not grep a metric"))
        .trim()
        .to_owned();
    let blocks = code_blocks(section);
    let lines = blocks
        .iter()
        .find(|(info, _)| info == "json")
        .map(|(_, body)| {
            body.lines()
                .map(|line| {
                    serde_json::from_str(line)
                        .unwrap_or_else(|err| panic!("README output line {line:?}: {err}"))
                })
                .collect()
        })
        .unwrap_or_else(|| panic!("README quick start shows no ```json output"));
    let metric_line = blocks
        .iter()
        .find(|(_, body)| body.starts_with(&metric))
        .map(|(_, body)| body.trim().to_owned())
        .unwrap_or_else(|| panic!("README quick start shows no `{metric}` line"));
    QuickStart {
        reading,
        device_address,
        file,
        api_address,
        metric,
        lines,
        metric_line,
    }
}

/// The gateway as a child process; killed and reaped when dropped.
struct Running {
    child: Child,
    dir: tempfile::TempDir,
}

impl Running {
    fn output(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(err) = self.child.kill() {
            eprintln!("kill fieldgate: {err}");
        }
        if let Err(err) = self.child.wait() {
            eprintln!("reap fieldgate: {err}");
        }
        if std::thread::panicking() {
            eprintln!("--- fieldgate stderr ---\n{}", self.output("stderr"));
        }
    }
}

/// `fieldgate default-config` with the README's two addresses moved to free ports.
fn default_config_on_free_ports(quick: &QuickStart) -> (String, SocketAddr, SocketAddr) {
    let output = Command::new(fieldgate_bin())
        .arg("default-config")
        .output()
        .unwrap_or_else(|err| panic!("cannot run fieldgate default-config: {err}"));
    assert!(output.status.success());
    let config = String::from_utf8_lossy(&output.stdout).into_owned();
    let device: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .unwrap_or_else(|err| panic!("{err}"));
    let api: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .unwrap_or_else(|err| panic!("{err}"));
    let mut moved = config.clone();
    for (readme_address, free) in [(&quick.device_address, device), (&quick.api_address, api)] {
        let line = format!("address = \"{readme_address}\"");
        assert!(
            config.contains(&line),
            "the README talks to {readme_address}, which the default config does not \
             listen on:\n{config}"
        );
        moved = moved.replace(&line, &format!("address = \"{free}\""));
    }
    (moved, device, api)
}

/// Compares an envelope line with the README's: the same keys and values, except the id
/// and the receive time, which differ on every run (only their form is checked).
fn same_envelope(actual: &Value, shown: &Value) -> Result<(), String> {
    let (Some(actual), Some(shown)) = (actual.as_object(), shown.as_object()) else {
        return Err("not a JSON object".into());
    };
    let keys = |object: &serde_json::Map<String, Value>| object.keys().cloned().collect::<Vec<_>>();
    if keys(actual) != keys(shown) {
        return Err(format!(
            "keys {:?}, README shows {:?}",
            keys(actual),
            keys(shown)
        ));
    }
    for (key, value) in actual {
        match key.as_str() {
            "id" if value.as_str().is_some_and(|id| id.len() == 20) => {}
            "received_at"
                if value
                    .as_str()
                    .is_some_and(|time| time.len() == 24 && time.ends_with('Z')) => {}
            _ if value == &shown[key] => {}
            _ => return Err(format!("{key}: {value}, README shows {}", shown[key])),
        }
    }
    Ok(())
}

/// The README's lines in the order `actual` has them, if `actual` holds exactly those.
fn matching_order<'a>(actual: &[Value], shown: &'a [Value]) -> Result<Vec<&'a Value>, String> {
    let mut left: Vec<&Value> = shown.iter().collect();
    let mut ordered = Vec::new();
    for line in actual {
        let Some(at) = left
            .iter()
            .position(|shown| same_envelope(line, shown).is_ok())
        else {
            let why: Vec<String> = shown
                .iter()
                .filter_map(|shown| same_envelope(line, shown).err())
                .collect();
            return Err(format!("{line} is not shown in the README: {why:?}"));
        };
        ordered.push(left.remove(at));
    }
    Ok(ordered)
}

/// Compares `text`'s envelope lines with the README's. The README shows the order a user
/// usually sees; the only other order possible is the reading before the `offline`
/// (when a sink takes the reading before the device's disconnect is handled), so the
/// lines must match one for one and the status lines keep the README's order.
fn compare(what: &str, text: &str, quick: &QuickStart) {
    let actual: Vec<Value> = text
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("{what}: {line:?}: {err}"))
        })
        .collect();
    assert_eq!(
        actual.len(),
        quick.lines.len(),
        "{what} holds {} envelope lines, the README shows {}:\n{text}",
        actual.len(),
        quick.lines.len()
    );
    let ordered =
        matching_order(&actual, &quick.lines).unwrap_or_else(|why| panic!("{what}: {why}\n{text}"));
    let status = |lines: Vec<&Value>| -> Vec<Value> {
        lines
            .into_iter()
            .filter(|line| line["kind"] == "status")
            .map(|line| line["payload"].clone())
            .collect()
    };
    assert_eq!(
        status(ordered),
        status(quick.lines.iter().collect()),
        "{what}: the status events are not in the README's order:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quick_start_shows_what_the_gateway_does() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap_or_else(|err| panic!("{err}"));
    let quick = parse_quick_start(&readme);
    let (config, device, api) = default_config_on_free_ports(&quick);

    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let config_path = dir.path().join("default.toml");
    std::fs::write(&config_path, &config).unwrap_or_else(|err| panic!("{err}"));
    let file = |name: &str| {
        std::fs::File::create(dir.path().join(name)).unwrap_or_else(|err| panic!("{err}"))
    };
    let child = Command::new(fieldgate_bin())
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start fieldgate: {err}"));
    let mut gateway = Running { child, dir };
    let ready = common::eventually_async(WAIT, || async {
        matches!(http_get(api, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "not ready within {WAIT:?} (exit: {:?})",
        gateway.child.try_wait()
    );

    // `echo READING | nc -q1 HOST PORT`: the line, then (input ended) the sending half
    // shut down; what the gateway answers is read for a second, then the socket closed.
    let mut connection = tokio::net::TcpStream::connect(device)
        .await
        .unwrap_or_else(|err| panic!("connect {device}: {err}"));
    connection
        .write_all(format!("{}\n", quick.reading).as_bytes())
        .await
        .unwrap_or_else(|err| panic!("send the reading: {err}"));
    connection
        .shutdown()
        .await
        .unwrap_or_else(|err| panic!("end the input: {err}"));
    let mut answer = Vec::new();
    let read = tokio::time::timeout(NC_QUIT_AFTER, connection.read_to_end(&mut answer)).await;
    assert!(
        !matches!(read, Ok(Err(_))),
        "reading the gateway's answer: {read:?}"
    );
    drop(connection);

    let events = gateway.dir.path().join(&quick.file);
    let expected = quick.lines.len();
    let written = eventually(WAIT, || {
        let text = std::fs::read_to_string(&events).ok()?;
        (text.lines().count() >= expected).then_some(text)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{} did not get {expected} lines within {WAIT:?}: {:?}",
            quick.file.display(),
            std::fs::read_to_string(&events)
        )
    });
    compare(&quick.file.display().to_string(), &written, &quick);

    // The console sink prints the same lines on stdout.
    let printed = eventually(WAIT, || {
        let text = gateway.output("stdout");
        (text.lines().filter(|line| line.starts_with('{')).count() >= expected).then_some(text)
    })
    .await
    .unwrap_or_else(|| panic!("stdout: {:?}", gateway.output("stdout")));
    compare("stdout", &printed, &quick);

    let (status, metrics) = http_get(api, "/metrics")
        .await
        .unwrap_or_else(|err| panic!("GET /metrics: {err}"));
    assert_eq!(status, 200);
    let served: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with(&quick.metric))
        .collect();
    assert_eq!(
        served,
        [quick.metric_line.as_str()],
        "/metrics serves other `{}` lines than the README shows",
        quick.metric
    );

    // What a user sees on stderr when it goes to a file.
    let log = gateway.output("stderr");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
    assert!(!log.contains("Some("), "a Debug form in the log:\n{log}");
    assert!(
        log.contains(&format!("address={device}")),
        "the source's address is not logged as a value:\n{log}"
    );
}
