//! The docs name only what the code has: every key in a table of docs/CONFIG.md is a key
//! `fieldgate check` knows, and every metric named in README.md or docs/*.md is served on
//! `/metrics` (or, while it has no sample yet, registered in src/).
//!
//! Keys are checked black-box, one at a time: the key, with a value of any type, goes into
//! the table its section names (`## [sinks.NAME.buffer]`, `### type = "mqtt"`, ...) of an
//! otherwise minimal config. `check` reads keys in order and reports an unknown one before
//! anything else, so "unknown field" means the code lost the key. Sections are read from
//! the headings, so a new component type needs no change here.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::{Gateway, fieldgate_bin, free_port, parse_samples};

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// One documented key: where CONFIG.md puts it.
#[derive(Debug, Clone)]
struct DocumentedKey {
    /// The TOML table, `NAME` replaced by `x` (`sinks.x.buffer`); empty for none.
    table: String,
    /// The component type the section is about (`tcp`, `mqtt`); `None` for every type.
    kind: Option<String>,
    /// The key.
    key: String,
    /// CONFIG.md line, for the failure message.
    line: usize,
}

/// The first `` `[...]` `` of a heading: the table it documents.
fn heading_table(heading: &str) -> Option<String> {
    let start = heading.find("`[")? + 2;
    let end = start + heading[start..].find("]`")?;
    Some(heading[start..end].replace("NAME", "x"))
}

/// The component type a heading names: `` type `tcp` `` or `` type = `"mqtt"` ``.
fn heading_kind(heading: &str) -> Option<String> {
    let rest = &heading[heading.find("type")? + "type".len()..];
    let rest = rest.trim_start().trim_start_matches('=').trim_start();
    let name = rest.trim_start_matches('`').trim_start_matches('"');
    let end = name.find(['"', '`'])?;
    (end > 0).then(|| name[..end].to_owned())
}

/// Every key of every `| key | ...` table, with its table and component type.
fn documented_keys(config_md: &str) -> Vec<DocumentedKey> {
    let mut keys = Vec::new();
    let mut section = String::new();
    let mut table = String::new();
    let mut kind: Option<String> = None;
    let mut in_key_table = false;
    for (index, line) in config_md.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading_table(heading).unwrap_or_default();
            table = section.clone();
            kind = heading_kind(heading);
            in_key_table = false;
        } else if let Some(heading) = line.strip_prefix("### ") {
            // `### [sinks.NAME.tls]` is a table of the type above it;
            // `### type = "file"` starts another type of the `##` section's component.
            match (heading_table(heading), heading_kind(heading)) {
                (Some(sub), _) => table = sub,
                (None, Some(sub)) => {
                    table = section.clone();
                    kind = Some(sub);
                }
                (None, None) => {}
            }
            in_key_table = false;
        } else if line.starts_with("| key |") {
            in_key_table = true;
        } else if !line.starts_with('|') {
            in_key_table = false;
        } else if in_key_table && !line.starts_with("|---") {
            let cell = line.split('|').nth(1).unwrap_or_default().trim();
            let key = cell.trim_matches('`');
            assert!(
                !key.is_empty() && key.len() + 2 == cell.len(),
                "docs/CONFIG.md:{}: a key cell must be one `key`: {line}",
                index + 1
            );
            keys.push(DocumentedKey {
                table: table.clone(),
                kind: kind.clone(),
                key: key.to_owned(),
                line: index + 1,
            });
        }
    }
    keys
}

/// The component types CONFIG.md has a heading for, in `sources` or `sinks`.
fn documented_kinds(config_md: &str, family: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut kinds = BTreeSet::new();
    for line in config_md.lines() {
        let Some(heading) = line
            .strip_prefix("## ")
            .or_else(|| line.strip_prefix("### "))
        else {
            continue;
        };
        if line.starts_with("## ") {
            section = heading_table(heading).unwrap_or_default();
        }
        if section.starts_with(&format!("{family}.")) {
            kinds.extend(heading_kind(heading));
        }
    }
    kinds
}

/// A config holding `key = "docs-check"` in `table`, inside a component of type `kind`
/// when the table belongs to one.
fn config_with(table: &str, kind: Option<&str>, key: &str) -> String {
    let mut text = String::from("[gateway]\nid = \"gw-docs\"\n");
    if table == "gateway" {
        text.push_str(&format!("{key} = \"docs-check\"\n"));
        return text;
    }
    let component: Option<String> = match table.split('.').collect::<Vec<_>>()[..] {
        [family @ ("sources" | "sinks"), name, ..] => Some(format!("{family}.{name}")),
        _ => None,
    };
    if let Some(component) = &component {
        let kind = kind.unwrap_or_else(|| panic!("[{table}] needs a component type"));
        text.push_str(&format!("[{component}]\ntype = \"{kind}\"\n"));
        if table == component {
            text.push_str(&format!("{key} = \"docs-check\"\n"));
            return text;
        }
    }
    text.push_str(&format!("[{table}]\n{key} = \"docs-check\"\n"));
    text
}

/// Runs `fieldgate check` on `text`; answers its stderr (empty on success).
fn check(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("docs-check.toml");
    std::fs::write(&path, text).unwrap_or_else(|err| panic!("{err}"));
    let output = Command::new(fieldgate_bin())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap_or_else(|err| panic!("cannot run fieldgate check: {err}"));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Why `check` does not know `key` in the config `text`, if it does not.
fn refusal(dir: &tempfile::TempDir, text: &str, key: &str) -> Option<String> {
    let stderr = check(dir, text);
    let unknown = stderr.contains(&format!("unknown field `{key}`"))
        || stderr.contains("unknown source type")
        || stderr.contains("unknown sink type");
    unknown.then_some(stderr)
}

#[test]
fn every_documented_config_key_is_known_to_check() {
    let config_md = read("docs/CONFIG.md");
    let keys = documented_keys(&config_md);
    assert!(
        keys.len() > 50,
        "docs/CONFIG.md: only {} keys found; did the table format change?",
        keys.len()
    );
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));

    // The method itself: an undocumented key is refused in every kind of place.
    for (table, kind) in [("gateway", None), ("sinks.x.buffer", Some("file"))] {
        let text = config_with(table, kind, "surely_not_a_key");
        assert!(
            refusal(&dir, &text, "surely_not_a_key").is_some(),
            "check accepted an unknown key in [{table}]:\n{text}"
        );
    }

    let sink_kinds = documented_kinds(&config_md, "sinks");
    let source_kinds = documented_kinds(&config_md, "sources");
    assert!(
        sink_kinds.len() >= 3 && !source_kinds.is_empty(),
        "component types from the headings: sinks {sink_kinds:?}, sources {source_kinds:?}"
    );
    let mut failures = Vec::new();
    for documented in &keys {
        let is_component = documented.table.matches('.').count() == 1
            && (documented.table.starts_with("sources.") || documented.table.starts_with("sinks."));
        if is_component && documented.key == "type" {
            continue; // Picks the component type; every config below sets it.
        }
        // A section about every type of a component (`[sinks.NAME]`, its buffer) is
        // checked on each documented type.
        let kinds: Vec<Option<&str>> = match (&documented.kind, documented.table.split('.').next())
        {
            (Some(kind), _) => vec![Some(kind.as_str())],
            (None, Some("sinks")) => sink_kinds.iter().map(|kind| Some(kind.as_str())).collect(),
            (None, Some("sources")) => source_kinds
                .iter()
                .map(|kind| Some(kind.as_str()))
                .collect(),
            (None, _) => vec![None],
        };
        for kind in kinds {
            let text = config_with(&documented.table, kind, &documented.key);
            if let Some(stderr) = refusal(&dir, &text, &documented.key) {
                failures.push(format!(
                    "docs/CONFIG.md:{}: `{}` in [{}]{}: {}",
                    documented.line,
                    documented.key,
                    documented.table,
                    kind.map(|kind| format!(" (type {kind})"))
                        .unwrap_or_default(),
                    stderr.trim()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} documented key(s) unknown to the code:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Metric names written in a document: `fieldgate_*`, and with `process` also `process_*`
/// (only README.md lists those; elsewhere `process_` starts function names).
fn metric_names(text: &str, process: bool) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let prefixes: &[&str] = if process {
        &["fieldgate_", "process_"]
    } else {
        &["fieldgate_"]
    };
    for prefix in prefixes {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            // A metric, not part of a longer word (`my_fieldgate_x`), a pattern
            // (`fieldgate_<thing>_total`) or a file name (`fieldgate_0.1.0_arm64.deb`).
            let standalone = !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            let word = name[prefix.len()..].starts_with(|c: char| c.is_ascii_lowercase());
            if standalone && word && !rest.starts_with('<') && !name.ends_with('_') {
                names.insert(name);
            }
        }
    }
    names
}

/// Whether the code registers `name`: a string literal `"X"` in src/ where `name` is `X`,
/// or `X` with the suffix the metrics library adds (`_total` for a counter, a unit).
/// A family with no sample yet (no drop so far, no MQTT sink) is not on `/metrics`.
fn registered(sources: &str, name: &str) -> bool {
    let mut bases = vec![name];
    bases.extend(name.strip_suffix("_total"));
    for unit in ["_seconds", "_bytes"] {
        bases.extend(name.strip_suffix(unit));
    }
    bases
        .iter()
        .any(|base| sources.contains(&format!("\"{base}\"")))
}

/// Every `*.rs` file under `dir`, concatenated.
fn rust_sources(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display())) {
        let path = entry.unwrap_or_else(|err| panic!("{err}")).path();
        if path.is_dir() {
            text.push_str(&rust_sources(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            text.push_str(&std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{err}")));
        }
    }
    text
}

/// Whether `/metrics` serves `name`: a sample, or a family whose samples carry it
/// (`X_total` of a counter `X`, `X_bucket`/`_sum`/`_count` of a histogram).
fn served(metrics: &str, name: &str) -> bool {
    let families: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    families.contains(name)
        || ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|family| families.contains(family))
            })
        || parse_samples(metrics)
            .iter()
            .any(|sample| sample.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_served() {
    let mut documents = vec!["README.md".to_owned()];
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for entry in std::fs::read_dir(&docs).unwrap_or_else(|err| panic!("{err}")) {
        let path = entry.unwrap_or_else(|err| panic!("{err}")).path();
        if path.extension().is_some_and(|ext| ext == "md") {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            documents.push(format!("docs/{name}"));
        }
    }
    documents.sort();

    let config = format!(
        "[gateway]\nid = \"gw-docs\"\n\n[api]\naddress = \"127.0.0.1:{}\"\n\n\
         [sources.devices]\ntype = \"tcp\"\naddress = \"127.0.0.1:{}\"\n\n\
         [sinks.local]\ntype = \"file\"\ninputs = [\"devices\"]\n",
        free_port(),
        free_port()
    );
    let gateway = Gateway::start(&config).await;
    let metrics = gateway.metrics().await;
    let sources = rust_sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut missing = Vec::new();
    let mut seen = 0;
    for document in &documents {
        for name in metric_names(&read(document), document == "README.md") {
            seen += 1;
            if !served(&metrics, &name) && !registered(&sources, &name) {
                missing.push(format!("{document}: {name}"));
            }
        }
    }
    assert!(seen > 10, "only {seen} metric names found in {documents:?}");
    assert!(
        missing.is_empty(),
        "documented metrics that /metrics does not serve and src/ does not register:\n{}\n\
         --- /metrics ---\n{metrics}",
        missing.join("\n")
    );
}

#[test]
fn headings_name_their_table_and_type() {
    assert_eq!(
        heading_table("`[sinks.NAME.buffer]`").as_deref(),
        Some("sinks.x.buffer")
    );
    assert_eq!(
        heading_kind("`[sources.NAME]` type `tcp`").as_deref(),
        Some("tcp")
    );
    assert_eq!(heading_kind("type = `\"mqtt\"`").as_deref(), Some("mqtt"));
    assert_eq!(heading_kind("`when_full`"), None);
    assert_eq!(
        metric_names(
            "`fieldgate_sent_events_total{sink}`, fieldgate_<thing>_total, process_open_fds",
            true
        ),
        ["fieldgate_sent_events_total", "process_open_fds"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
}
