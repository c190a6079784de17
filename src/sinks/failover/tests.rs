//! The failover switch: the decision rule, the monitor under paused time, and a
//! model-based property test of random up/down/time sequences, with an event routed
//! after every step to check it lands in exactly the intake the model expects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;

use super::*;
use crate::pipeline::{FailoverRoute, IntakeReceiver, Item, intake};
use crate::sinks::link::{LinkHealth, SinkLinks};
use crate::telemetry::Metrics;
use crate::transforms::tests::event_json;

const AFTER: Duration = Duration::from_secs(30);

fn config(to: &str, after: Duration) -> FailoverConfig {
    FailoverConfig {
        to: toml::Spanned::new(0..0, to.to_owned()),
        after: toml::Spanned::new(0..0, after),
    }
}

/// Lets the monitor task run to its next wait.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

#[test]
fn fails_over_only_after_being_down_for_the_whole_delay() {
    let start = Instant::now();
    let down = LinkState {
        up: false,
        since: start,
    };
    let up = LinkState { up: true, ..down };
    assert!(!should_fail_over(down, AFTER, start));
    assert!(!should_fail_over(
        down,
        AFTER,
        start + AFTER - Duration::from_millis(1)
    ));
    assert!(should_fail_over(down, AFTER, start + AFTER));
    assert!(!should_fail_over(up, AFTER, start + AFTER * 10));
    assert_eq!(next_switch(down, AFTER, start), Some(start + AFTER));
    assert_eq!(next_switch(down, AFTER, start + AFTER), None);
    assert_eq!(next_switch(up, AFTER, start), None);
}

#[test]
fn failover_after_defaults_to_thirty_seconds() {
    let config = FailoverConfig::from_keys(Some(toml::Spanned::new(0..0, "b".into())), None);
    assert_eq!(config.map(|config| config.after()), Some(AFTER));
    assert_eq!(FailoverConfig::from_keys(None, None), None);
}

#[tokio::test(start_paused = true)]
async fn switches_over_after_the_delay_and_back_when_healthy() {
    let links = SinkLinks::default();
    let metrics = Metrics::new();
    let configs = BTreeMap::from([("eu".to_owned(), config("eu-backup", AFTER))]);
    let failovers = Failovers::start(&configs, &links, &metrics, None);
    let switch = Arc::clone(&failovers.switches()["eu"]);
    let gauge = metrics.failover_active("eu");
    let switches = metrics.failover_switches("eu");
    settle().await;
    assert!(!switch.is_active());

    links.get("eu").report(false);
    tokio::time::advance(AFTER - Duration::from_millis(1)).await;
    settle().await;
    assert!(!switch.is_active(), "not before failover_after");
    // A failed reconnect while down does not restart the clock.
    links.get("eu").report(false);
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    assert!(switch.is_active());
    assert_eq!(gauge.get(), 1);
    assert_eq!(switches.get(), 1);

    links.get("eu").report(true);
    settle().await;
    assert!(!switch.is_active(), "back as soon as the link is healthy");
    assert_eq!(gauge.get(), 0);
    assert_eq!(switches.get(), 1, "only switch-overs are counted");

    // A reload keeps the switch (and its position) for the same primary and failover.
    links.get("eu").report(false);
    tokio::time::advance(AFTER).await;
    settle().await;
    assert!(switch.is_active());
    let reloaded = Failovers::start(&configs, &links, &metrics, Some(&failovers));
    assert!(Arc::ptr_eq(&reloaded.switches()["eu"], &switch));
    failovers.stop().await;
    settle().await;
    assert!(switch.is_active());
    assert_eq!(switches.get(), 2);
    reloaded.stop().await;
}

#[derive(Debug, Clone)]
enum Step {
    Up,
    Down,
    Wait(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        Just(Step::Up),
        Just(Step::Down),
        (0u64..5_000).prop_map(Step::Wait),
    ]
}

/// The state the model predicts.
struct Model {
    up: bool,
    since_ms: u64,
    now_ms: u64,
    after_ms: u64,
    active: bool,
    switch_overs: u64,
    redirected: u64,
}

impl Model {
    fn apply(&mut self, step: &Step) {
        match step {
            Step::Up | Step::Down => {
                let up = matches!(step, Step::Up);
                if up != self.up {
                    self.up = up;
                    self.since_ms = self.now_ms;
                }
            }
            Step::Wait(ms) => self.now_ms += ms,
        }
        let active = !self.up && self.now_ms - self.since_ms >= self.after_ms;
        if active && !self.active {
            self.switch_overs += 1;
        }
        self.active = active;
    }
}

fn drain(receiver: &mut IntakeReceiver) -> usize {
    std::iter::from_fn(|| receiver.normal.try_recv().ok()).count()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_switch_follows_the_model(
        after_ms in 1u64..4_000,
        steps in proptest::collection::vec(step(), 1..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let links = SinkLinks::default();
            let metrics = Metrics::new();
            let after = Duration::from_millis(after_ms);
            let configs = BTreeMap::from([("p".to_owned(), config("b", after))]);
            let failovers = Failovers::start(&configs, &links, &metrics, None);
            let (primary, mut primary_rx) = intake();
            let (backup, mut backup_rx) = intake();
            let route = FailoverRoute {
                primary,
                backup,
                switch: Arc::clone(&failovers.switches()["p"]),
            };
            let link: LinkHealth = links.get("p");
            let event = event_json(br#"{"device":"d","seq":1}"#);
            settle().await;
            let mut model = Model {
                up: true,
                since_ms: 0,
                now_ms: 0,
                after_ms,
                active: false,
                switch_overs: 0,
                redirected: 0,
            };
            for step in &steps {
                match step {
                    Step::Up => link.report(true),
                    Step::Down => link.report(false),
                    Step::Wait(ms) => tokio::time::advance(Duration::from_millis(*ms)).await,
                }
                settle().await;
                model.apply(step);
                prop_assert_eq!(route.switch.is_active(), model.active, "after {:?}", step);
                prop_assert_eq!(metrics.failover_active("p").get(), i64::from(model.active));
                let sent = route.pick().try_send(Item { event: event.clone(), ack: None });
                prop_assert!(sent.is_ok());
                let (to_primary, to_backup) = (drain(&mut primary_rx), drain(&mut backup_rx));
                prop_assert_eq!(to_primary + to_backup, 1, "one intake, never both");
                prop_assert_eq!(to_backup == 1, model.active);
                model.redirected += u64::from(model.active);
            }
            prop_assert_eq!(metrics.failover_switches("p").get(), model.switch_overs);
            prop_assert_eq!(route.switch.redirected(), model.redirected);
            failovers.stop().await;
            Ok(())
        })?;
    }
}
