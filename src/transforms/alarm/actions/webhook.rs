//! The webhook action's HTTP/1.1 client: one POST of the alarm event's JSON per attempt,
//! on a fresh connection, each attempt bounded by `timeout`; failed attempts are retried
//! after a delay that starts at `backoff` and doubles (capped, jittered) up to `retries`
//! times. A 2xx answer is success; 4xx other than 408 and 429 is final (the receiver
//! refused this payload, sending it again would not help); anything else (5xx, no
//! answer, a closed or reset connection, a malformed answer) is retried.
//!
//! `http://` and `https://` (rustls; the system's roots, or the action's `ca` file); the
//! answer's body is not read beyond its head.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Longest delay between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest `url`.
const MAX_URL: usize = 2048;

/// A checked webhook target.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The URL as configured (for errors and logs).
    pub url: String,
    /// TLS for an `https://` URL, with its server name.
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    host: String,
    port: u16,
    /// Path and query.
    path: String,
    /// Time allowed per attempt (connect, send, answer head).
    pub timeout: Duration,
    /// Further attempts after a failed one.
    pub retries: u32,
    /// Delay before the first retry.
    pub backoff: Duration,
}

/// Why a delivery failed for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("POST {url}: {last} (after {attempts} attempt{s})", s = if *attempts == 1 { "" } else { "s" })]
pub struct WebhookError {
    /// The URL.
    pub url: String,
    /// Attempts made.
    pub attempts: u32,
    /// What went wrong in the last one.
    pub last: String,
}

/// One attempt's outcome.
enum Attempt {
    Delivered,
    /// Worth another attempt.
    Retry(String),
    /// Not worth another attempt.
    Final(String),
}

impl Endpoint {
    /// Checks `url` (`http[s]://host[:port][/path]`); an `https://` URL trusts `ca` (a
    /// PEM file), or the system's roots without it.
    pub fn parse(
        url: &str,
        ca: Option<&Path>,
        timeout: Duration,
        retries: u32,
        backoff: Duration,
    ) -> Result<Self, String> {
        if url.len() > MAX_URL {
            return Err(format!("longer than {MAX_URL} bytes"));
        }
        if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("contains whitespace or control characters".into());
        }
        let (rest, secure) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Err(format!("{url:?} must start with http:// or https://")),
        };
        if ca.is_some() && !secure {
            return Err("`ca` is for an https:// url".into());
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        let default_port = if secure { 443 } else { 80 };
        if authority.contains('@') {
            return Err("credentials in the URL are not supported".into());
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| "an IPv6 host without its `]`".to_owned())?;
            let port = match after.strip_prefix(':') {
                Some(port) => parse_port(port)?,
                None if after.is_empty() => default_port,
                None => return Err("garbage after the IPv6 host".into()),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, parse_port(port)?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        if path.parse::<hyper::Uri>().is_err() {
            return Err(format!("{path:?} is not a valid path"));
        }
        let tls = if secure {
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|err| format!("{host:?} is not a TLS server name: {err}"))?;
            // `fieldgate check` and tests may get here before `run` installed the
            // process's provider; installing the same one again is a no-op.
            drop(rustls::crypto::ring::default_provider().install_default());
            let config = crate::net::tls::client_config(ca, None).map_err(|err| match ca {
                Some(ca) => format!("ca {}: {err}", ca.display()),
                None => err.to_string(),
            })?;
            Some((config, name))
        } else {
            None
        };
        Ok(Self {
            url: url.to_owned(),
            tls,
            host: host.to_owned(),
            port,
            path,
            timeout,
            retries,
            backoff,
        })
    }

    /// Posts `body` until it is delivered, the retries are spent, or `stop` fires.
    /// `on_retry` is called before each retry (for the retry counter).
    pub async fn deliver(
        &self,
        body: &Bytes,
        stop: &CancellationToken,
        mut on_retry: impl FnMut(),
    ) -> Result<(), WebhookError> {
        let mut delay = self.backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let outcome = match tokio::time::timeout(self.timeout, self.attempt(body)).await {
                Ok(outcome) => outcome,
                Err(_) => Attempt::Retry(format!("no answer within {:?}", self.timeout)),
            };
            let last = match outcome {
                Attempt::Delivered => return Ok(()),
                Attempt::Final(last) => {
                    return Err(self.failed(attempts, last));
                }
                Attempt::Retry(last) => last,
            };
            if attempts > self.retries {
                return Err(self.failed(attempts, last));
            }
            tracing::debug!(url = %self.url, attempt = attempts, error = %last, "webhook attempt failed; retrying");
            on_retry();
            // Jittered (50-100 %) so a fleet's retries do not arrive in lockstep.
            let pause = delay.mul_f64(0.5 + fastrand::f64() / 2.0);
            tokio::select! {
                () = stop.cancelled() => {
                    return Err(self.failed(attempts, format!("{last}; retries abandoned at shutdown")));
                }
                () = tokio::time::sleep(pause) => {}
            }
            delay = delay.saturating_mul(2).min(MAX_BACKOFF);
        }
    }

    fn failed(&self, attempts: u32, last: String) -> WebhookError {
        WebhookError {
            url: self.url.clone(),
            attempts,
            last,
        }
    }

    async fn attempt(&self, body: &Bytes) -> Attempt {
        let stream = match tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await {
            Ok(stream) => stream,
            Err(err) => return Attempt::Retry(format!("cannot connect: {err}")),
        };
        match &self.tls {
            None => self.exchange(stream, body).await,
            Some((config, name)) => {
                let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
                match connector.connect(name.clone(), stream).await {
                    Ok(stream) => self.exchange(stream, body).await,
                    Err(err) => Attempt::Retry(format!("TLS handshake: {err}")),
                }
            }
        }
    }

    /// One request and the head of its answer over `stream`.
    async fn exchange<S>(&self, stream: S, body: &Bytes) -> Attempt
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) =
            match hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
            {
                Ok(pair) => pair,
                Err(err) => return Attempt::Retry(format!("HTTP handshake: {err}")),
            };
        let host = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let request = hyper::Request::post(self.path.as_str())
            .header(HOST, host)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len())
            .header(USER_AGENT, concat!("fieldgate/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body.clone()));
        let request = match request {
            Ok(request) => request,
            Err(err) => return Attempt::Final(format!("cannot build the request: {err}")),
        };
        // The connection future does the I/O; drive it until the answer's head is in. A
        // receiver that answers and closes at once may end the connection first: the
        // answer is then already with the sender.
        let answer = sender.send_request(request);
        tokio::pin!(answer);
        tokio::pin!(connection);
        let answer = tokio::select! {
            answer = &mut answer => answer,
            closed = &mut connection => match closed {
                Err(err) => return Attempt::Retry(format!("connection failed: {err}")),
                Ok(()) => answer.await,
            },
        };
        let status = match answer {
            Ok(response) => response.status(),
            Err(err) => return Attempt::Retry(format!("no valid answer: {err}")),
        };
        if status.is_success() {
            Attempt::Delivered
        } else if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
            Attempt::Final(format!("refused with HTTP {}", status.as_u16()))
        } else {
            Attempt::Retry(format!("HTTP {}", status.as_u16()))
        }
    }
}

fn parse_port(port: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{port:?} is not a port")),
        Ok(port) => Ok(port),
    }
}

#[cfg(test)]
mod tests;
