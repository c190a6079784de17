//! Broker URLs: `mqtt://host:port` and `mqtts://host:port`.

/// Where the broker is and whether to use TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// Host name or IP (without brackets).
    pub host: String,
    /// TCP port (default 1883, or 8883 with TLS).
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

impl BrokerAddress {
    /// Parses a broker URL; `None` if it is not `mqtt[s]://HOST[:PORT]`.
    pub fn parse(url: &str) -> Option<Self> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            (false, url.strip_prefix("mqtt://")?)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '@', '?', '#']) {
            return None;
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(port) => port.parse().ok()?,
                None if after.is_empty() => default_port,
                None => return None,
            };
            (host, port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().ok()?),
                None => (rest, default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return None;
        }
        Some(Self {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            BrokerAddress::parse("mqtt://127.0.0.1:1883"),
            Some(BrokerAddress {
                host: "127.0.0.1".into(),
                port: 1883,
                tls: false
            })
        );
        assert_eq!(
            BrokerAddress::parse("mqtts://broker.example").map(|a| (a.port, a.tls)),
            Some((8883, true))
        );
        assert_eq!(
            BrokerAddress::parse("mqtt://[::1]:1884").map(|a| a.host),
            Some("::1".into())
        );
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://u@h",
            "mqtt://h/p",
            "mqtt://h:x",
        ] {
            assert_eq!(BrokerAddress::parse(bad), None, "{bad}");
        }
    }
}
