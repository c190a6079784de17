//! The webhook client against a scripted receiver on loopback that misbehaves on
//! purpose: answers 500, hangs, closes without answering, sends garbage, refuses with
//! 404, then answers 200.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Endpoint;

/// What the receiver does with one connection.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Status(u16),
    Hang,
    Close,
    Garbage,
}

/// A receiver on a free loopback port playing `script` (the last step repeats); keeps
/// every request body it read.
struct Receiver {
    port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&buffer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                return Some(text[end + 4..end + 4 + length].to_owned());
            }
        }
    }
}

async fn receiver(script: Vec<Behaviour>) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    let task = tokio::spawn(async move {
        let mut step = 0;
        let mut hung = Vec::new();
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let behaviour = script[step.min(script.len() - 1)];
            step += 1;
            let Some(body) = read_request(&mut socket).await else {
                continue;
            };
            match behaviour {
                Behaviour::Status(code) => {
                    seen.lock().expect("lock").push(body);
                    let answer = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n");
                    drop(socket.write_all(answer.as_bytes()).await);
                }
                Behaviour::Hang => hung.push(socket),
                Behaviour::Close => drop(socket),
                Behaviour::Garbage => {
                    drop(socket.write_all(b"\x00\x01 not http at all\r\n\r\n").await);
                }
            }
        }
    });
    Receiver { port, bodies, task }
}

fn endpoint(port: u16, retries: u32) -> Endpoint {
    Endpoint::parse(
        &format!("http://127.0.0.1:{port}/hook?x=1"),
        None,
        Duration::from_millis(300),
        retries,
        Duration::from_millis(10),
    )
    .expect("valid url")
}

#[tokio::test]
async fn retries_through_500_hang_close_and_garbage_then_delivers() {
    use Behaviour::{Close, Garbage, Hang, Status};
    let receiver = receiver(vec![Status(500), Hang, Close, Garbage, Status(200)]).await;
    let mut retries = 0;
    let body = Bytes::from_static(br#"{"state":"raised"}"#);
    endpoint(receiver.port, 5)
        .deliver(&body, &CancellationToken::new(), || retries += 1)
        .await
        .expect("delivered on the fifth attempt");
    assert_eq!(retries, 4);
    // The 500 and the 200 read a whole body; it is the alarm's JSON, unchanged.
    let bodies = receiver.bodies.lock().expect("lock").clone();
    assert_eq!(bodies, vec![r#"{"state":"raised"}"#; 2]);
}

#[tokio::test]
async fn gives_up_after_its_retries_naming_the_last_error() {
    let receiver = receiver(vec![Behaviour::Status(503)]).await;
    let err = endpoint(receiver.port, 2)
        .deliver(&Bytes::from_static(b"{}"), &CancellationToken::new(), || {})
        .await
        .expect_err("always 503");
    assert_eq!(err.attempts, 3);
    assert_eq!(err.last, "HTTP 503");
    assert!(err.to_string().contains("/hook?x=1"), "{err}");
}

#[tokio::test]
async fn a_refusal_is_final_but_429_is_retried() {
    let receiver = receiver(vec![Behaviour::Status(404)]).await;
    let err = endpoint(receiver.port, 5)
        .deliver(&Bytes::from_static(b"{}"), &CancellationToken::new(), || {})
        .await
        .expect_err("404");
    assert_eq!(err.attempts, 1, "{err}");
    let receiver = receiver_429_then_ok().await;
    endpoint(receiver.port, 1)
        .deliver(&Bytes::from_static(b"{}"), &CancellationToken::new(), || {})
        .await
        .expect("429 then 200");
}

async fn receiver_429_then_ok() -> Receiver {
    receiver(vec![Behaviour::Status(429), Behaviour::Status(204)]).await
}

#[tokio::test]
async fn nobody_listening_is_an_error_not_a_hang() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let err = endpoint(port, 1)
        .deliver(&Bytes::from_static(b"{}"), &CancellationToken::new(), || {})
        .await
        .expect_err("refused");
    assert_eq!(err.attempts, 2);
    assert!(err.last.starts_with("cannot connect"), "{err}");
}

#[tokio::test]
async fn shutdown_abandons_the_retries() {
    let receiver = receiver(vec![Behaviour::Status(500)]).await;
    let stop = CancellationToken::new();
    stop.cancel();
    let slow = Endpoint::parse(
        &format!("http://127.0.0.1:{}/", receiver.port),
        None,
        Duration::from_secs(1),
        10,
        Duration::from_secs(30),
    )
    .expect("valid");
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        slow.deliver(&Bytes::from_static(b"{}"), &stop, || {}),
    )
    .await
    .expect("returns at once")
    .expect_err("abandoned");
    assert_eq!(err.attempts, 1);
    assert!(err.last.contains("shutdown"), "{err}");
}

#[test]
fn parses_urls_and_refuses_hostile_ones() {
    let parse = |url: &str| {
        Endpoint::parse(
            url,
            None,
            Duration::from_secs(1),
            0,
            Duration::from_millis(10),
        )
    };
    let ok = parse("http://127.0.0.1:9000/hook").expect("valid");
    assert_eq!(
        (ok.host.as_str(), ok.port, ok.path.as_str()),
        ("127.0.0.1", 9000, "/hook")
    );
    let ok = parse("http://sirens.local").expect("valid");
    assert_eq!((ok.port, ok.path.as_str()), (80, "/"));
    let ok = parse("http://[::1]:81?a=b").expect("valid");
    assert_eq!(
        (ok.host.as_str(), ok.port, ok.path.as_str()),
        ("::1", 81, "/?a=b")
    );
    let long = format!("http://h/{}", "a".repeat(3000));
    for bad in [
        "ftp://x/",
        "127.0.0.1:9000",
        "http://",
        "http://:80/",
        "http://h:0/",
        "http://h:99999/",
        "http://h:x/",
        "http://user:pw@h/",
        "http://h/a b",
        "http://h/\r\nX-Injected: 1",
        "http://[::1/",
        long.as_str(),
    ] {
        assert!(parse(bad).is_err(), "{bad:?} accepted");
    }
}

/// `https://`: a receiver whose certificate chains to the action's `ca` gets the POST; a
/// client without that CA refuses the receiver (a failure, retried), and a `ca` file that
/// is not a certificate is refused at check.
#[tokio::test]
async fn https_trusts_the_configured_ca_and_refuses_others() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    drop(rustls::crypto::ring::default_provider().install_default());
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let (ca_path, cert_path, key_path) = (
        write("ca.pem", ca.pem()),
        write("cert.pem", cert.pem()),
        write("key.pem", key.serialize_pem()),
    );
    let acceptor = crate::net::tls::acceptor(&cert_path, &key_path, None).expect("acceptor");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    let server = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut stream) = acceptor.accept(socket).await else {
                continue;
            };
            let mut buffer = vec![0u8; 4096];
            let mut read = 0;
            while !String::from_utf8_lossy(&buffer[..read]).ends_with("{}") {
                match stream.read(&mut buffer[read..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
            seen.lock()
                .expect("lock")
                .push(String::from_utf8_lossy(&buffer[..read]).into_owned());
            drop(
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await,
            );
            drop(stream.shutdown().await);
        }
    });
    let url = format!("https://localhost:{port}/hook");
    let trusting = Endpoint::parse(
        &url,
        Some(&ca_path),
        Duration::from_secs(5),
        0,
        Duration::from_millis(10),
    )
    .expect("valid");
    trusting
        .deliver(&Bytes::from_static(b"{}"), &CancellationToken::new(), || {})
        .await
        .expect("delivered over TLS");
    let request = bodies.lock().expect("lock").clone();
    assert_eq!(request.len(), 1);
    assert!(request[0].starts_with("POST /hook HTTP/1.1"), "{request:?}");

    let system_roots = Endpoint::parse(
        &url,
        None,
        Duration::from_secs(5),
        1,
        Duration::from_millis(10),
    )
    .expect("valid");
    let err = system_roots
        .deliver(&Bytes::from_static(b"{}"), &CancellationToken::new(), || {})
        .await
        .expect_err("an unknown issuer");
    assert_eq!(err.attempts, 2);
    assert!(err.last.starts_with("TLS handshake"), "{err}");

    let not_pem = write("junk.pem", "not a certificate".into());
    assert!(
        Endpoint::parse(
            &url,
            Some(&not_pem),
            Duration::from_secs(1),
            0,
            Duration::from_millis(10)
        )
        .is_err()
    );
    assert!(
        Endpoint::parse(
            "http://h/",
            Some(&ca_path),
            Duration::from_secs(1),
            0,
            Duration::from_millis(10)
        )
        .is_err()
    );
    server.abort();
}
