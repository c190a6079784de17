//! Config loading: the contract snippet, defaults, and every error naming file, line and key.

use crate::buffer::{FsyncPolicy, WhenFull};
use crate::config::*;
use crate::sinks::SinkConfig;
use crate::sinks::mqtt::config::{MqttProtocol, Qos};
use crate::sources::SourceConfig;
use crate::topology::{Components, Config};

/// The issue's reference config, kept verbatim (after a header comment) in the examples.
const CONTRACT: &str = include_str!("../../examples/cloud-mqtt.toml");

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse_ok(text: &str) -> Config {
    parse::<Components>("test.toml", text, no_env).unwrap_or_else(|err| panic!("{err}"))
}

fn parse_err(text: &str) -> ConfigError {
    match parse::<Components>("test.toml", text, no_env) {
        Ok(_) => panic!("config should have been rejected:\n{text}"),
        Err(err) => err,
    }
}

/// The contract snippet with one line replaced.
fn contract_with(from: &str, to: &str) -> String {
    assert!(CONTRACT.contains(from), "{from} not in contract");
    CONTRACT.replacen(from, to, 1)
}

#[test]
fn contract_snippet_loads() {
    let config = parse_ok(CONTRACT);
    assert_eq!(config.settings.gateway.id, "gw-1");
    let SourceConfig::Tcp(tcp) = &config.components.sources["devices"] else {
        panic!("tcp expected")
    };
    assert_eq!(tcp.address.get_ref().port(), 7000);
    assert_eq!(tcp.max_frame, ByteSize(64 * 1024));
    assert_eq!(tcp.heartbeat_interval.0, std::time::Duration::from_secs(30));
    let SinkConfig::Mqtt(mqtt) = &config.components.sinks["cloud"] else {
        panic!("mqtt expected")
    };
    assert_eq!(mqtt.qos, Qos(1));
    assert_eq!(mqtt.buffer.max_size, ByteSize(1 << 30));
    assert_eq!(mqtt.buffer.when_full, WhenFull::Block);
    assert_eq!(mqtt.buffer.fsync, FsyncPolicy::Interval);
    assert_eq!(mqtt.keep_alive.0, std::time::Duration::from_secs(30));
    assert!(!mqtt.clean_session);
}

#[test]
fn embedded_default_loads() {
    let config = parse_ok(DEFAULT_CONFIG);
    assert_eq!(config.components.sinks.len(), 2);
    assert!(matches!(
        config.components.sinks["local"],
        SinkConfig::File(_)
    ));
}

#[test]
fn unknown_key_names_line_and_key() {
    let err = parse_err(&contract_with(
        "framing = \"lines\"",
        "framing = \"lines\"\nadress = \"x\"",
    ));
    assert_eq!(err.key.as_deref(), Some("sources.devices.adress"), "{err}");
    assert_eq!(err.line, Some(16), "{err}");
    assert!(
        err.to_string()
            .starts_with("test.toml:16: key `sources.devices.adress`"),
        "{err}"
    );
}

#[test]
fn unknown_key_in_nested_table() {
    let err = parse_err(&contract_with(
        "when_full = \"block\"",
        "when_full = \"block\"\nmax_sise = \"1GiB\"",
    ));
    assert_eq!(
        err.key.as_deref(),
        Some("sinks.cloud.buffer.max_sise"),
        "{err}"
    );
}

#[test]
fn unknown_top_level_key() {
    let err = parse_err(&format!("{CONTRACT}\n[gatway]\nid = \"x\"\n"));
    assert!(err.to_string().contains("gatway"), "{err}");
}

#[test]
fn wrong_type_names_key() {
    let err = parse_err(&contract_with("qos = 1", "qos = \"high\""));
    assert_eq!(err.key.as_deref(), Some("sinks.cloud.qos"), "{err}");
    assert_eq!(err.line, Some(23), "{err}");
    let err = parse_err(&contract_with("max_size = \"1GiB\"", "max_size = 1024"));
    assert_eq!(
        err.key.as_deref(),
        Some("sinks.cloud.buffer.max_size"),
        "{err}"
    );
    assert!(err.message.contains("unit"), "{err}");
}

#[test]
fn out_of_range_values() {
    assert!(
        parse_err(&contract_with("qos = 1", "qos = 3"))
            .message
            .contains("QoS")
    );
    let err = parse_err(&contract_with(
        "when_full = \"block\"",
        "when_full = \"wait\"",
    ));
    assert_eq!(
        err.key.as_deref(),
        Some("sinks.cloud.buffer.when_full"),
        "{err}"
    );
    let err = parse_err(&contract_with(
        "address = \"127.0.0.1:7000\"",
        "address = \"localhost:99999\"",
    ));
    assert_eq!(err.key.as_deref(), Some("sources.devices.address"), "{err}");
}

#[test]
fn input_naming_no_source() {
    let err = parse_err(&contract_with(
        "inputs = [\"devices\"]",
        "inputs = [\"devcies\"]",
    ));
    assert_eq!(err.key.as_deref(), Some("sinks.cloud.inputs"), "{err}");
    assert_eq!(err.line, Some(19));
    assert!(err.message.contains("devcies"), "{err}");
}

#[test]
fn two_listeners_on_one_port() {
    let err = parse_err(&contract_with(
        "address = \"127.0.0.1:7000\"",
        "address = \"0.0.0.0:8080\"",
    ));
    assert_eq!(err.key.as_deref(), Some("sources.devices.address"), "{err}");
    assert!(err.message.contains("api.address"), "{err}");
    // Same port on two different concrete IPs is allowed.
    parse_ok(&contract_with(
        "address = \"127.0.0.1:7000\"",
        "address = \"127.0.0.2:8080\"",
    ));
}

#[test]
fn unknown_component_types() {
    let err = parse_err(&contract_with("type = \"tcp\"", "type = \"udp\""));
    assert_eq!(err.key.as_deref(), Some("sources.devices.type"), "{err}");
    let err = parse_err(&contract_with("type = \"mqtt\"", "type = \"kafka\""));
    assert_eq!(err.key.as_deref(), Some("sinks.cloud.type"), "{err}");
    let err = parse_err(&contract_with("type = \"tcp\"\n", ""));
    assert!(err.message.contains("type"), "{err}");
}

#[test]
fn mqtt_checks() {
    for (from, to, key) in [
        (
            "url = \"mqtt://127.0.0.1:1883\"",
            "url = \"http://x\"",
            "sinks.cloud.url",
        ),
        (
            "url = \"mqtt://127.0.0.1:1883\"",
            "url = \"mqtt://h:0\"",
            "sinks.cloud.url",
        ),
        (
            "topic = \"gateways/{gateway}/devices/{device}/{kind}\"",
            "topic = \"a/{nope}\"",
            "sinks.cloud.topic",
        ),
        (
            "topic = \"gateways/{gateway}/devices/{device}/{kind}\"",
            "topic = \"a/#\"",
            "sinks.cloud.topic",
        ),
        (
            "qos = 1",
            "qos = 1\nqos_by_kind = { alrm = 2 }",
            "sinks.cloud.qos_by_kind",
        ),
        (
            "qos = 1",
            "qos = 1\ncommand_topic = \"a/b\"",
            "sinks.cloud.command_topic",
        ),
        (
            "qos = 1",
            "qos = 1\nbatch_max_events = 0",
            "sinks.cloud.batch_max_events",
        ),
        (
            "qos = 1",
            "qos = 1\nreconnect_min = \"2m\"",
            "sinks.cloud.reconnect_min",
        ),
        (
            "qos = 1",
            "qos = 1\npassword = \"x\"",
            "sinks.cloud.password",
        ),
        (
            "qos = 1",
            "qos = 1\nprotocol = \"6\"",
            "sinks.cloud.protocol",
        ),
        ("qos = 1", "qos = 1\nprotocol = 4", "sinks.cloud.protocol"),
        (
            "qos = 1",
            "qos = 1\nstatus_topic = \"s/{source}\"",
            "sinks.cloud.status_topic",
        ),
        (
            "qos = 1",
            "qos = 1\nbatch_topic = \"b/{device}\"",
            "sinks.cloud.batch_topic",
        ),
        (
            "qos = 1",
            "qos = 1\ncommand_topic = \"c/{source}/+\"",
            "sinks.cloud.command_topic",
        ),
    ] {
        let err = parse_err(&contract_with(from, to));
        assert_eq!(err.key.as_deref(), Some(key), "{to}: {err}");
    }
    let config = parse_ok(&contract_with(
        "qos = 1",
        "qos = 1\nqos_by_kind = { alarm = 2 }\nprotocol = \"5\"",
    ));
    let SinkConfig::Mqtt(mqtt) = &config.components.sinks["cloud"] else {
        panic!()
    };
    assert_eq!(mqtt.qos_for(fieldgate_core::EventKind::Alarm), Qos(2));
    assert_eq!(mqtt.qos_for(fieldgate_core::EventKind::Telemetry), Qos(1));
    assert_eq!(mqtt.protocol, MqttProtocol::V5);
}

#[test]
fn registry_auth_needs_a_registry() {
    let err = parse_err(&contract_with("framing = \"lines\"", "auth = \"registry\""));
    assert_eq!(err.key.as_deref(), Some("sources.devices.auth"), "{err}");
    parse_ok(&format!(
        "{}\n[registry]\n",
        contract_with("framing = \"lines\"", "auth = \"registry\"")
    ));
}

#[test]
fn token_auth_needs_tokens() {
    let err = parse_err(&contract_with("framing = \"lines\"", "auth = \"token\""));
    assert_eq!(err.key.as_deref(), Some("sources.devices.tokens"), "{err}");
}

#[test]
fn environment_interpolation() {
    let text = contract_with("client_id = \"gw-1\"", "client_id = \"${CLIENT}\"");
    let config = parse::<Components>("test.toml", &text, |name| {
        (name == "CLIENT").then(|| "from-env".to_owned())
    })
    .unwrap();
    let SinkConfig::Mqtt(mqtt) = &config.components.sinks["cloud"] else {
        panic!()
    };
    assert_eq!(mqtt.client_id.as_deref(), Some("from-env"));
    let err = parse_err(&text);
    assert_eq!(err.line, Some(21));
    assert_eq!(err.key.as_deref(), Some("sinks.cloud.client_id"), "{err}");
    assert!(err.message.contains("CLIENT"), "{err}");
}

#[test]
fn hostile_input_is_an_error_not_a_panic() {
    for text in [
        "",
        "\0\0\0",
        "[[[",
        "gateway = 5",
        "sources = 5\n[gateway]\nid=\"a\"",
        "[gateway]\nid = \"a/b\"\n[sinks.x]\ntype=\"console\"\ninputs=[]",
        &"[a]\n".repeat(10_000),
        &format!("[gateway]\nid = \"{}\"", "x".repeat(1 << 20)),
    ] {
        assert!(
            parse::<Components>("test.toml", text, no_env).is_err(),
            "must be rejected: {text:.60}"
        );
    }
}

#[test]
fn missing_file_names_it() {
    let err = load::<Components>(std::path::Path::new("/nonexistent/fieldgate.toml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/nonexistent/fieldgate.toml: cannot read"),
        "{err}"
    );
}

#[test]
fn keys_name_their_table() {
    let err = parse_err(&contract_with(
        "data_dir = \"./data\"",
        "datadir = \"./data\"",
    ));
    assert_eq!(err.key.as_deref(), Some("gateway.datadir"), "{err}");
    let err = parse_err(&contract_with("id = \"gw-1\"", "id = 5"));
    assert_eq!(err.key.as_deref(), Some("gateway.id"), "{err}");
    let err = parse_err(&contract_with(
        "framing = \"lines\"",
        "framing = \"lines\"\n[sources.devices.tls]\ncert = \"a.pem\"",
    ));
    assert_eq!(err.key.as_deref(), Some("sources.devices.tls.key"), "{err}");
    let err = parse_err(&contract_with("qos = 1", "qos = 1\nqos = 2"));
    assert_eq!(err.key.as_deref(), Some("sinks.cloud.qos"), "{err}");
    let err = parse_err(&contract_with("[sinks.cloud]", "[sink.cloud]"));
    assert!(err.message.contains("sinks"), "{err}");
}

#[test]
fn run_time_failures_are_caught_by_check() {
    for (from, to, key) in [
        (
            "when_full = \"block\"",
            "fsync_interval = \"0s\"",
            "sinks.cloud.buffer.fsync_interval",
        ),
        (
            "when_full = \"block\"",
            "max_size = \"1024\"",
            "sinks.cloud.buffer.max_size",
        ),
        (
            "when_full = \"block\"",
            "max_size = \"0B\"",
            "sinks.cloud.buffer.max_size",
        ),
        (
            "framing = \"lines\"",
            "heartbeat_interval = \"0s\"",
            "sources.devices.heartbeat_interval",
        ),
        (
            "framing = \"lines\"",
            "frame_timeout = \"0s\"",
            "sources.devices.frame_timeout",
        ),
        (
            "framing = \"lines\"",
            "max_frame = \"1B\"",
            "sources.devices.max_frame",
        ),
        ("[api]", "[log]\nlevel = \"info,[bad\"\n[api]", "log.level"),
    ] {
        let err = parse_err(&contract_with(from, to));
        assert_eq!(err.key.as_deref(), Some(key), "{to}: {err}");
    }
}

#[test]
fn three_listeners_share_no_port() {
    let text = format!(
        "{}\n[sources.a]\ntype = \"tcp\"\naddress = \"127.0.0.2:8080\"\n[sources.b]\ntype = \"tcp\"\naddress = \"127.0.0.1:8080\"\n",
        CONTRACT.replace(
            "inputs = [\"devices\"]",
            "inputs = [\"devices\", \"a\", \"b\"]"
        )
    );
    let err = parse_err(&text);
    assert_eq!(err.key.as_deref(), Some("sources.b.address"), "{err}");
}

#[test]
fn a_source_no_sink_reads_is_an_error() {
    let text =
        format!("{CONTRACT}\n[sources.spare]\ntype = \"tcp\"\naddress = \"127.0.0.1:7001\"\n");
    let err = parse_err(&text);
    assert_eq!(err.key.as_deref(), Some("sources.spare"), "{err}");
}

/// The contract snippet with its TCP source authenticating against the registry.
fn registry_contract() -> String {
    contract_with(
        "framing = \"lines\"",
        "framing = \"lines\"\nauth = \"registry\"",
    )
}

#[test]
fn unproven_sources_are_refused_beside_the_registry() {
    for auth in ["", "auth = \"none\"", "auth = \"token\"\ntokens = [\"t\"]"] {
        let text = format!(
            "{}\n[registry]\n",
            contract_with(
                "framing = \"lines\"",
                &format!("framing = \"lines\"\n{auth}")
            )
        );
        let err = parse_err(&text);
        assert_eq!(
            err.key.as_deref(),
            Some("sources.devices.auth"),
            "{auth}: {err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("beside [registry]") && message.contains("registered device's id"),
            "{auth}: {message}"
        );
    }
    parse_ok(&format!("{}\n[registry]\n", registry_contract()));
}

#[test]
fn registry_section_has_defaults_and_allows_the_http_input() {
    let config = parse_ok(&format!(
        "{}\n[registry]\n",
        registry_contract().replace("inputs = [\"devices\"]", "inputs = [\"devices\", \"http\"]")
    ));
    let registry = config
        .settings
        .registry
        .unwrap_or_else(|| panic!("registry expected"));
    assert_eq!(registry.jwt_ttl.0, std::time::Duration::from_secs(3600));
    assert_eq!(
        registry.refresh_ttl.0,
        std::time::Duration::from_secs(30 * 24 * 3600)
    );
    let config = parse_ok(&format!(
        "{}\n[registry]\njwt_ttl = \"15m\"\nrefresh_ttl = \"7d\"\n",
        registry_contract()
    ));
    assert!(
        config
            .settings
            .registry
            .is_some_and(|r| r.jwt_ttl.0.as_secs() == 900)
    );
    assert!(parse_ok(CONTRACT).settings.registry.is_none());
}

#[test]
fn registry_values_are_checked() {
    for (section, key) in [
        ("jwt_ttl = \"0s\"", "registry.jwt_ttl"),
        ("jwt_ttl = \"2d\"", "registry.jwt_ttl"),
        (
            "jwt_ttl = \"1h\"\nrefresh_ttl = \"30m\"",
            "registry.refresh_ttl",
        ),
        ("refresh_ttl = \"400d\"", "registry.refresh_ttl"),
        ("jwt_tll = \"1h\"", "registry.jwt_tll"),
    ] {
        let err = parse_err(&format!("{}\n[registry]\n{section}\n", registry_contract()));
        assert_eq!(err.key.as_deref(), Some(key), "{section}: {err}");
    }
}

#[test]
fn http_input_needs_the_registry_and_the_api() {
    let with_http = contract_with("inputs = [\"devices\"]", "inputs = [\"devices\", \"http\"]");
    let err = parse_err(&with_http);
    assert_eq!(err.key.as_deref(), Some("sinks.cloud.inputs"), "{err}");
    let without_api = format!(
        "{}\n[registry]\n",
        registry_contract()
            .replace("inputs = [\"devices\"]", "inputs = [\"devices\", \"http\"]")
            .replace("[api]\naddress = \"127.0.0.1:8080\"\n", "")
    );
    let err = parse_err(&without_api);
    assert_eq!(err.key.as_deref(), Some("sinks.cloud.inputs"), "{err}");
    assert!(err.to_string().contains("[api]"), "{err}");
    let shadowing = format!(
        "{}\n[registry]\n[sources.http]\ntype = \"tcp\"\naddress = \"127.0.0.1:7001\"\n",
        contract_with("inputs = [\"devices\"]", "inputs = [\"devices\", \"http\"]")
    );
    let err = parse_err(&shadowing);
    assert_eq!(err.key.as_deref(), Some("sources.http"), "{err}");
}

#[test]
fn watchdog_defaults_and_keys() {
    let config = parse_ok(CONTRACT);
    assert_eq!(
        config.settings.watchdog.interval.0,
        std::time::Duration::from_secs(10)
    );
    assert_eq!(
        config.settings.watchdog.rss_growth_limit,
        ByteSize(50 * 1024 * 1024)
    );
    assert_eq!(config.settings.watchdog.rss_limit, None);
    assert_eq!(
        config.settings.watchdog.cooldown.0,
        std::time::Duration::from_secs(600)
    );
    let config = parse_ok(&format!(
        "{CONTRACT}\n[watchdog]\ninterval = \"2s\"\nrss_growth_limit = \"10MiB\"\nrss_limit = \"512MiB\"\ncooldown = \"1h\"\n"
    ));
    assert_eq!(
        config.settings.watchdog.interval.0,
        std::time::Duration::from_secs(2)
    );
    assert_eq!(
        config.settings.watchdog.rss_growth_limit,
        ByteSize(10 * 1024 * 1024)
    );
    assert_eq!(
        config.settings.watchdog.rss_limit,
        Some(ByteSize(512 * 1024 * 1024))
    );
    assert_eq!(
        config.settings.watchdog.cooldown.0,
        std::time::Duration::from_secs(3600)
    );
}

#[test]
fn watchdog_bad_values_name_their_key() {
    for (line, key) in [
        ("interval = 10", "watchdog.interval"),
        ("interval = \"soon\"", "watchdog.interval"),
        ("interval = \"0s\"", "watchdog.interval"),
        ("interval = \"10ms\"", "watchdog.interval"),
        ("cooldown = \"0s\"", "watchdog.cooldown"),
        ("rss_growth_limit = 52428800", "watchdog.rss_growth_limit"),
        ("rss_growth_limit = \"0B\"", "watchdog.rss_growth_limit"),
        ("rss_limit = \"0B\"", "watchdog.rss_limit"),
        ("rss_limit = true", "watchdog.rss_limit"),
        ("rss_limt = \"1GiB\"", "watchdog.rss_limt"),
    ] {
        let err = parse_err(&format!("{CONTRACT}\n[watchdog]\n{line}\n"));
        assert_eq!(err.key.as_deref(), Some(key), "{line}: {err}");
    }
    let err = parse_err(&format!("{CONTRACT}\n[watchdog]\nrss_limt = \"1GiB\"\n"));
    assert!(
        err.message.contains("rss_limit"),
        "lists the known keys: {err}"
    );
    let err = parse_err(&format!("{CONTRACT}\nwatchdog = 5\n"));
    assert!(err.to_string().contains("watchdog"), "{err}");
}

#[test]
fn api_admin_token() {
    assert_eq!(parse_ok(CONTRACT).settings.api.unwrap().admin_token, None);
    let text = contract_with(
        "address = \"127.0.0.1:8080\"",
        "address = \"127.0.0.1:8080\"\nadmin_token = \"${ADMIN_TOKEN}\"",
    );
    let config = parse::<Components>("test.toml", &text, |name| {
        (name == "ADMIN_TOKEN").then(|| "s3cret".to_owned())
    })
    .unwrap();
    assert_eq!(
        config.settings.api.unwrap().admin_token.as_deref(),
        Some("s3cret")
    );
    let err = parse::<Components>("test.toml", &text, |_| Some(String::new())).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("api.admin_token"), "{err}");
    let err = parse_err(&contract_with(
        "address = \"127.0.0.1:8080\"",
        "address = \"127.0.0.1:8080\"\nadmin_token = 42",
    ));
    assert_eq!(err.key.as_deref(), Some("api.admin_token"), "{err}");
    let err = parse_err(&contract_with(
        "address = \"127.0.0.1:8080\"",
        "address = \"127.0.0.1:8080\"\nadmin_tokn = \"x\"",
    ));
    assert_eq!(err.key.as_deref(), Some("api.admin_tokn"), "{err}");
}

#[test]
fn largest_frame_must_fit_every_buffer_it_feeds() {
    let text = contract_with(
        "framing = \"lines\"",
        "framing = \"lines\"\nmax_frame = \"4MiB\"",
    )
    .replace("max_size = \"1GiB\"", "max_size = \"1MiB\"");
    let err = parse_err(&text);
    assert_eq!(
        err.key.as_deref(),
        Some("sinks.cloud.buffer.max_size"),
        "{err}"
    );
    assert!(err.message.contains("sources.devices.max_frame"), "{err}");

    // Just under the limit is fine: a 1 MiB buffer takes a 1000 KiB frame with its headers.
    parse_ok(
        &contract_with(
            "framing = \"lines\"",
            "framing = \"lines\"\nmax_frame = \"1000KiB\"",
        )
        .replace("max_size = \"1GiB\"", "max_size = \"1MiB\""),
    );
    // A frame the size of the whole buffer cannot fit beside the record and segment headers.
    let err = parse_err(
        &contract_with(
            "framing = \"lines\"",
            "framing = \"lines\"\nmax_frame = \"1MiB\"",
        )
        .replace("max_size = \"1GiB\"", "max_size = \"1MiB\""),
    );
    assert_eq!(
        err.key.as_deref(),
        Some("sinks.cloud.buffer.max_size"),
        "{err}"
    );
}

#[test]
fn http_ingestion_body_must_fit_its_buffers() {
    let text = contract_with("inputs = [\"devices\"]", "inputs = [\"devices\", \"http\"]")
        .replace("max_size = \"1GiB\"", "max_size = \"1MiB\"")
        .replace(
            "framing = \"lines\"",
            "framing = \"lines\"\nauth = \"registry\"",
        )
        + "\n[registry]\n";
    let err = parse_err(&text);
    assert_eq!(
        err.key.as_deref(),
        Some("sinks.cloud.buffer.max_size"),
        "{err}"
    );
    assert!(err.message.contains("\"http\""), "{err}");
    parse_ok(&text.replace("max_size = \"1MiB\"", "max_size = \"2MiB\""));
}

#[test]
fn api_previous_admin_token() {
    let with = |extra: &str| {
        contract_with(
            "address = \"127.0.0.1:8080\"",
            &format!("address = \"127.0.0.1:8080\"\n{extra}"),
        )
    };
    let config = parse_ok(&with(
        "admin_token = \"new\"\nprevious_admin_token = \"old\"\n\
         previous_admin_token_until = \"2026-12-09T00:00:00Z\"",
    ));
    let api = config.settings.api.unwrap();
    assert_eq!(api.previous_admin_token.as_deref(), Some("old"));
    assert!(api.previous_admin_token_until.is_some());
    for (extra, key) in [
        (
            "admin_token = \"new\"\nprevious_admin_token = \"old\"",
            "api.previous_admin_token",
        ),
        (
            "admin_token = \"new\"\nprevious_admin_token_until = \"2026-12-09T00:00:00Z\"",
            "api.previous_admin_token",
        ),
        (
            "admin_token = \"same\"\nprevious_admin_token = \"same\"\n\
             previous_admin_token_until = \"2026-12-09T00:00:00Z\"",
            "api.previous_admin_token",
        ),
        (
            "previous_admin_token = \"old\"\nprevious_admin_token_until = \"2026-12-09T00:00:00Z\"",
            "api.previous_admin_token",
        ),
        (
            "admin_token = \"new\"\nprevious_admin_token = \"old\"\n\
             previous_admin_token_until = \"next tuesday\"",
            "api.previous_admin_token_until",
        ),
    ] {
        let err = parse_err(&with(extra));
        assert_eq!(err.key.as_deref(), Some(key), "{extra}: {err}");
    }
}

#[test]
fn network_defence_keys_have_defaults() {
    let config = parse_ok(CONTRACT);
    let SourceConfig::Tcp(tcp) = &config.components.sources["devices"] else {
        panic!("tcp expected")
    };
    assert_eq!(tcp.hello_timeout.0, std::time::Duration::from_secs(10));
    assert_eq!(tcp.unauthenticated_max_frame, ByteSize(4 * 1024));
    assert_eq!(
        config.settings.gateway.partial_frame_budget,
        ByteSize(64 * 1024 * 1024)
    );
    let api = config
        .settings
        .api
        .unwrap_or_else(|| panic!("[api] expected"));
    assert_eq!(api.header_timeout.0, std::time::Duration::from_secs(10));
    assert_eq!(api.idle_timeout.0, std::time::Duration::from_secs(120));
    assert_eq!(api.max_connections, 256);
    assert_eq!(api.fd_reserve, 128);
}

#[test]
fn network_defence_values_are_checked() {
    for (from, to, key) in [
        (
            "framing = \"lines\"",
            "hello_timeout = \"0s\"",
            "sources.devices.hello_timeout",
        ),
        (
            "framing = \"lines\"",
            "hello_timeout = \"10\"",
            "sources.devices.hello_timeout",
        ),
        (
            "framing = \"lines\"",
            "unauthenticated_max_frame = \"100B\"",
            "sources.devices.unauthenticated_max_frame",
        ),
        (
            "data_dir = \"./data\"",
            "partial_frame_budget = \"16KiB\"",
            "gateway.partial_frame_budget",
        ),
        (
            "address = \"127.0.0.1:8080\"",
            "address = \"127.0.0.1:8080\"\nheader_timeout = \"0s\"",
            "api.header_timeout",
        ),
        (
            "address = \"127.0.0.1:8080\"",
            "address = \"127.0.0.1:8080\"\nidle_timeout = \"0ms\"",
            "api.idle_timeout",
        ),
        (
            "address = \"127.0.0.1:8080\"",
            "address = \"127.0.0.1:8080\"\nmax_connections = 0",
            "api.max_connections",
        ),
        (
            "address = \"127.0.0.1:8080\"",
            "address = \"127.0.0.1:8080\"\nfd_reserve = 8",
            "api.fd_reserve",
        ),
    ] {
        // `[api]` lines replace the address line; the others go after their anchor.
        let to = if from.starts_with("address") {
            to.to_owned()
        } else {
            format!("{from}\n{to}")
        };
        let err = parse_err(&contract_with(from, &to));
        assert_eq!(err.key.as_deref(), Some(key), "{to}: {err}");
    }
    // The budget must hold the largest frame of a source.
    let err = parse_err(
        &contract_with(
            "data_dir = \"./data\"",
            "data_dir = \"./data\"\npartial_frame_budget = \"1MiB\"",
        )
        .replace(
            "framing = \"lines\"",
            "framing = \"lines\"\nmax_frame = \"2MiB\"",
        ),
    );
    assert_eq!(
        err.key.as_deref(),
        Some("gateway.partial_frame_budget"),
        "{err}"
    );
}

mod hostile_properties {
    //! The loader on generated hostile text: an error or a config, never a panic. The
    //! hand-picked cases are in `hostile_input_is_an_error_not_a_panic` above.

    use super::*;
    use proptest::prelude::*;

    /// Splits on a char boundary at or below `at`.
    fn prefix(text: &str, at: usize) -> &str {
        let mut at = at.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        &text[..at]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_text_is_an_error_not_a_panic(text in "\\PC{0,400}") {
            let _outcome = parse::<Components>("fuzz.toml", &text, no_env);
        }

        #[test]
        fn toml_like_text_is_an_error_not_a_panic(
            text in r#"(\[{1,2}[a-z_.]{0,12}\]{0,2}\n|[a-z_.]{1,12} ?= ?("[^"\n]{0,12}"|[0-9_.eE+-]{1,12}|true|\[\]|\{\}|"\$\{[A-Z]{0,3}\}?")\n|\x00|#[^\n]{0,8}\n){0,30}"#,
        ) {
            let _outcome = parse::<Components>("fuzz.toml", &text, no_env);
        }

        #[test]
        fn truncated_contract_is_an_error_not_a_panic(at in 0usize..CONTRACT.len()) {
            let _outcome = parse::<Components>("fuzz.toml", prefix(CONTRACT, at), no_env);
        }

        #[test]
        fn contract_with_a_line_replaced_never_panics(line in any::<prop::sample::Index>(), with in "\\PC{0,80}") {
            let lines: Vec<&str> = CONTRACT.lines().collect();
            let index = line.index(lines.len());
            let text = lines
                .iter()
                .enumerate()
                .map(|(i, l)| if i == index { with.as_str() } else { l })
                .collect::<Vec<_>>()
                .join("\n");
            let _outcome = parse::<Components>("fuzz.toml", &text, no_env);
        }

        #[test]
        fn hostile_env_values_never_panic(value in "\\PC{0,200}") {
            let text = CONTRACT.replacen("id = \"gw-1\"", "id = \"${GATEWAY_ID}\"", 1);
            let _outcome = parse::<Components>("fuzz.toml", &text, |_| Some(value.clone()));
        }
    }
}

/// A config with one TCP source `devices`, the given transforms, and one file sink
/// `out` reading `sink_inputs`.
fn graph(transforms: &str, sink_inputs: &str) -> String {
    format!(
        "[gateway]\nid = \"gw\"\n\n[sources.devices]\ntype = \"tcp\"\naddress = \"127.0.0.1:7000\"\n\n\
         {transforms}\n\n[sinks.out]\ntype = \"file\"\ninputs = {sink_inputs}\n"
    )
}

#[test]
fn graph_cycle_is_an_error_that_shows_it() {
    let err = parse_err(&graph(
        "[transforms.a]\ntype = \"filter\"\ninputs = [\"devices\", \"b\"]\ncondition = { kind = \"telemetry\" }\n\
         [transforms.b]\ntype = \"filter\"\ninputs = [\"a\"]\ncondition = { kind = \"telemetry\" }",
        "[\"b\"]",
    ));
    assert!(err.message.contains("cycle"), "{err}");
    assert!(
        err.message.contains("a → b → a") || err.message.contains("b → a → b"),
        "{err}"
    );
    assert!(
        err.key
            .as_deref()
            .is_some_and(|key| key.starts_with("transforms.")),
        "{err}"
    );
}

#[test]
fn graph_self_loop_is_a_cycle() {
    let err = parse_err(&graph(
        "[transforms.a]\ntype = \"filter\"\ninputs = [\"a\"]\ncondition = { kind = \"telemetry\" }",
        "[\"devices\", \"a\"]",
    ));
    assert!(err.message.contains("cycle"), "{err}");
}

#[test]
fn graph_unknown_input_lists_what_exists() {
    let err = parse_err(&graph("", "[\"devicez\"]"));
    assert_eq!(err.key.as_deref(), Some("sinks.out.inputs"), "{err}");
    assert!(
        err.message.contains("devicez") && err.message.contains("devices"),
        "{err}"
    );
    let err = parse_err(&graph(
        "[transforms.a]\ntype = \"filter\"\ninputs = [\"nowhere\"]\ncondition = { kind = \"telemetry\" }",
        "[\"a\"]",
    ));
    assert_eq!(err.key.as_deref(), Some("transforms.a.inputs"), "{err}");
}

#[test]
fn graph_dangling_transform_output_is_an_error() {
    let err = parse_err(&graph(
        "[transforms.unread]\ntype = \"filter\"\ninputs = [\"devices\"]\ncondition = { kind = \"alarm\" }",
        "[\"devices\"]",
    ));
    assert_eq!(err.key.as_deref(), Some("transforms.unread"), "{err}");
    assert!(err.message.contains("lost"), "{err}");
}

#[test]
fn graph_route_outputs_are_named() {
    let route = "[transforms.r]\ntype = \"route\"\ninputs = [\"devices\"]\n\
                 routes.hot = { field = \"temp\", gt = 30 }";
    let config = parse_ok(&graph(route, "[\"r.hot\", \"r._unmatched\"]"));
    assert_eq!(config.components.transforms.len(), 1);
    // Unread named outputs are allowed: routing them nowhere is the point.
    parse_ok(&graph(route, "[\"r.hot\"]"));
    let err = parse_err(&graph(route, "[\"r\"]"));
    assert!(err.message.contains("only named outputs"), "{err}");
    assert!(err.message.contains("r.hot, r._unmatched"), "{err}");
    let err = parse_err(&graph(route, "[\"r.cold\"]"));
    assert!(err.message.contains("no output \"cold\""), "{err}");
}

#[test]
fn graph_a_transform_cannot_take_a_source_name() {
    let err = parse_err(&graph(
        "[transforms.devices]\ntype = \"filter\"\ninputs = [\"devices\"]\ncondition = { kind = \"alarm\" }",
        "[\"devices\"]",
    ));
    assert_eq!(err.key.as_deref(), Some("transforms.devices"), "{err}");
}

#[test]
fn graph_transform_configs_are_checked() {
    let err = parse_err(&graph(
        "[transforms.u]\ntype = \"remap\"\ninputs = [\"devices\"]\nconvert.t = { from = \"degC\", to = \"bar\" }",
        "[\"u\"]",
    ));
    assert_eq!(err.key.as_deref(), Some("transforms.u.convert.t"), "{err}");
    let err = parse_err(&graph(
        "[transforms.u]\ntype = \"remap\"\ninputs = [\"devices\"]",
        "[\"u\"]",
    ));
    assert!(err.message.contains("at least one of"), "{err}");
    let err = parse_err(&graph(
        "[transforms.u]\ntype = \"sort\"\ninputs = [\"devices\"]",
        "[\"u\"]",
    ));
    assert_eq!(err.key.as_deref(), Some("transforms.u.type"), "{err}");
    assert!(err.message.contains("\"filter\""), "{err}");
}

#[test]
fn graph_built_in_sources_come_with_the_registry() {
    let text = graph("", "[\"devices\"]")
        .replace("type = \"tcp\"", "type = \"tcp\"\nauth = \"registry\"")
        .replace(
            "[gateway]\nid = \"gw\"",
            "[gateway]\nid = \"gw\"\n\n[registry]\n\n[api]\naddress = \"127.0.0.1:7001\"",
        );
    let config = parse_ok(&text);
    let sources: Vec<&str> = config
        .components
        .sources
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(sources, ["commands", "devices", "http"]);
    let without = parse_ok(&graph("", "[\"devices\"]"));
    assert_eq!(without.components.sources.len(), 1);
}

#[test]
fn graph_redacts_secrets_and_hashes_the_text() {
    let config = parse_ok(&contract_with(
        "[sinks.cloud]",
        "[sinks.cloud]\nusername = \"u\"\npassword = \"hunter2\"",
    ));
    assert!(!config.redacted().to_string().contains("hunter2"));
    assert_eq!(config.hash.len(), 64);
    let again = parse_ok(&contract_with(
        "[sinks.cloud]",
        "[sinks.cloud]\nusername = \"u\"\npassword = \"hunter2\"",
    ));
    assert_eq!(config.hash, again.hash);
    assert_ne!(config.hash, parse_ok(CONTRACT).hash);
}

/// Issue 13's SQL snippet, verbatim after a `devices` source: the sink without `url`
/// publishes to a broker on this host.
#[test]
fn sql_rule_snippet_loads_as_written() {
    let text = r#"[gateway]
id = "gw-1"

[sources.devices]
type = "tcp"
address = "127.0.0.1:7000"

[transforms.hot]
type = "sql"
inputs = ["devices"]
sql = "SELECT device, avg(temp) AS avg_temp, max(temp) AS max_temp, count(*) AS n FROM devices WHERE kind = 'telemetry' GROUP BY device, TUMBLINGWINDOW(ss, 2)"

[sinks.cloud]
type = "mqtt"
inputs = ["hot"]
"#;
    let config = parse_ok(text);
    let SinkConfig::Mqtt(mqtt) = &config.components.sinks["cloud"] else {
        panic!("mqtt expected")
    };
    assert_eq!(mqtt.url.get_ref(), "mqtt://127.0.0.1:1883");
    assert!(config.components.transforms.contains_key("hot"));
}
