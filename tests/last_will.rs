//! Gateway status on the upstream broker: retained `online` after each connect, the last
//! will (retained `offline`) after kill -9, a clean retained `offline` and exit 0 on SIGTERM.

mod common;

use std::time::Duration;

use common::{Gateway, GatewayConfig, Mosquitto, Msg, Subscriber, free_port};
use tokio::time::Instant;

const STATUS: &str = "gateways/gw-1/status";

/// The retained status as a fresh subscriber sees it (None: nothing within 2 s).
async fn retained_status(port: u16) -> Option<Msg> {
    let fresh = Subscriber::connect_with(port, STATUS, None).await;
    fresh
        .wait_until(Duration::from_secs(2), |m| !m.is_empty())
        .await
        .then(|| fresh.messages().remove(0))
}

/// Waits until `watcher` has seen `payload` as its latest status message.
async fn wait_status(watcher: &Subscriber, payload: &str, limit: Duration) {
    let seen = watcher
        .wait_until(limit, |m| {
            m.last().is_some_and(|m| m.text().trim() == payload)
        })
        .await;
    assert!(
        seen,
        "status {payload:?} not seen on {STATUS} within {limit:?}; got {:?}",
        watcher
            .messages()
            .iter()
            .map(|m| (m.text(), m.retain))
            .collect::<Vec<_>>()
    );
}

/// Asserts that the retained value is `payload`, giving the broker up to 10 s to store it.
async fn assert_retained(port: u16, payload: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        let msg = retained_status(port).await;
        if msg
            .as_ref()
            .is_some_and(|m| m.retain && m.text().trim() == payload)
        {
            return;
        }
        last = msg;
    }
    panic!("retained status is not {payload:?}: a fresh subscriber got {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_online_and_clean_offline() {
    let broker = Mosquitto::start(free_port()).await;
    let watcher = Subscriber::connect_with(broker.port, STATUS, None).await;
    let config = GatewayConfig::new(broker.port).sink("keep_alive = \"2s\"");
    let mut gateway = Gateway::start(&config.render()).await;

    wait_status(&watcher, "online", Duration::from_secs(30)).await;
    assert_retained(broker.port, "online").await;

    // kill -9: no DISCONNECT, so the broker publishes the will once the keep-alive
    // (2 s, x1.5) expires; the process is gone, so the TCP close may also trigger it.
    gateway.kill9();
    wait_status(&watcher, "offline", Duration::from_secs(20)).await;
    assert_retained(broker.port, "offline").await;

    gateway.restart().await;
    wait_status(&watcher, "online", Duration::from_secs(30)).await;
    assert_retained(broker.port, "online").await;

    let status = gateway.terminate().await;
    assert!(
        status.success(),
        "fieldgate exited with {status} on SIGTERM\n{}",
        gateway.stderr_tail(30)
    );
    wait_status(&watcher, "offline", Duration::from_secs(20)).await;
    assert_retained(broker.port, "offline").await;
}
