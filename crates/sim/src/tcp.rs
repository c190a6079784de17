//! A simulated TCP device: connect, hello, send paced telemetry, read replies;
//! in ack mode keep unacknowledged messages and resend them after a reconnect.
//!
//! Link states: Connecting -> Session -> (Finished | Lost -> backoff -> Connecting).
//! Bounds: at most `window` unacked messages are kept; reply frames are
//! capped; the device gives up at duration + drain timeout.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, sleep_until, timeout};

use crate::framing::Framing;
use crate::net::{self, BoxConn, Connector};
use crate::pacing::{Backoff, Pacer};
use crate::run::{DeviceModel, RunShared};
use crate::stats::{self, Counters};
use crate::template::{RandomWalk, Vars, hello_json, json_string};
use crate::tokens::HelloTokens;

/// Most messages written in one go when unpaced without acks.
const UNPACED_BATCH: usize = 64;
/// Most overdue paced messages caught up in one write.
const CATCH_UP_BATCH: usize = 64;
/// Bytes read from the socket per call.
const READ_CHUNK: usize = 1024;

/// Immutable settings of a TCP device run.
pub struct TcpPlan {
    /// Device behaviour.
    pub model: DeviceModel,
    /// Where to connect.
    pub connector: Connector,
    /// Wire framing.
    pub framing: Framing,
    /// Send a hello first.
    pub hello: bool,
    /// Token for each device's hello.
    pub tokens: HelloTokens,
    /// Ack mode.
    pub ack: bool,
}

/// How a session on one connection ended.
enum SessionEnd {
    /// Nothing left to do (or out of time, or cancelled).
    Finished,
    /// The connection broke; reconnect if time remains.
    Lost(String),
}

/// A gateway -> device frame; only the fields we act on.
#[derive(Deserialize)]
struct Reply {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    id: Option<serde_json::Value>,
}

/// Everything one device remembers across reconnects.
struct Device {
    slot: usize,
    id: String,
    seq: u64,
    walk: RandomWalk,
    pacer: Pacer,
    rng: fastrand::Rng,
    send_until: Instant,
    give_up_at: Instant,
    done_sending: bool,
    /// Frames sent but not acked (ack mode), oldest first.
    unacked: VecDeque<(u64, Vec<u8>)>,
}

/// Runs one device until it has sent everything (and, in ack mode, got it acked) or runs out of time.
pub async fn device(plan: Arc<TcpPlan>, run: Arc<RunShared>, slot: usize) {
    let mut rng = fastrand::Rng::new();
    let started = Instant::now();
    let send_until = started + plan.model.duration;
    let mut device = Device {
        slot,
        id: plan.model.ids.name(slot),
        seq: 0,
        walk: RandomWalk::new(&mut rng),
        pacer: Pacer::new(plan.model.rate, plan.model.jitter, started, &mut rng),
        rng,
        send_until,
        give_up_at: send_until + plan.model.drain_timeout,
        done_sending: false,
        unacked: VecDeque::new(),
    };
    device.run(&plan, &run).await;
}

impl Device {
    async fn run(&mut self, plan: &TcpPlan, run: &RunShared) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            self.check_done(plan);
            if run.cancel.is_cancelled()
                || Instant::now() >= self.give_up_at
                || (self.done_sending && self.unacked.is_empty())
            {
                return;
            }
            let connected = tokio::select! {
                () = run.cancel.cancelled() => return,
                () = sleep_until(self.give_up_at) => return,
                connected = plan.connector.connect() => connected,
            };
            let mut conn = match connected {
                Ok(conn) => conn,
                Err(error) => {
                    Counters::add(&run.counters.connect_failures, 1);
                    if net::is_fd_exhaustion(&error) {
                        net::report_fd_exhaustion("connect", &error);
                        run.errors.record("fd_exhausted", || {
                            format!(
                                "{}: connect to {}: {error}; {}",
                                self.id,
                                plan.connector.addr,
                                net::FD_HINT
                            )
                        });
                    } else {
                        run.errors.record("connect", || {
                            format!("{}: connect to {}: {error}", self.id, plan.connector.addr)
                        });
                    }
                    let delay = backoff.next_delay(&mut self.rng);
                    if !self.wait(delay, run).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            run.counters.connection_opened();
            let end = self.session(plan, run, &mut conn).await;
            run.counters.connection_closed();
            match end {
                SessionEnd::Finished => {
                    // Best effort: a clean FIN (and TLS close_notify) so the gateway reads everything.
                    if timeout(Duration::from_secs(2), conn.shutdown())
                        .await
                        .is_err()
                    {
                        run.errors
                            .record("close", || format!("{}: shutdown timed out", self.id));
                    }
                    return;
                }
                SessionEnd::Lost(reason) => {
                    Counters::add(&run.counters.disconnects, 1);
                    run.errors.record("disconnect", || {
                        format!(
                            "{}: connection to {} lost: {reason}",
                            self.id, plan.connector.addr
                        )
                    });
                    let delay = backoff.next_delay(&mut self.rng);
                    if !self.wait(delay, run).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps `delay` unless cancelled or out of time; false when the device should stop.
    async fn wait(&self, delay: Duration, run: &RunShared) -> bool {
        let until = (Instant::now() + delay).min(self.give_up_at);
        tokio::select! {
            () = run.cancel.cancelled() => false,
            () = sleep_until(until) => Instant::now() < self.give_up_at,
        }
    }

    fn check_done(&mut self, plan: &TcpPlan) {
        if self.seq >= plan.model.messages
            || self
                .pacer
                .next_due(Instant::now(), self.send_until)
                .is_none()
        {
            self.done_sending = true;
        }
    }

    async fn session(&mut self, plan: &TcpPlan, run: &RunShared, conn: &mut BoxConn) -> SessionEnd {
        let mut out = Vec::with_capacity(256);
        if plan.hello {
            plan.framing.encode(
                hello_json(&self.id, plan.tokens.get(&self.id)).as_bytes(),
                &mut out,
            );
        }
        for (_, frame) in &self.unacked {
            out.extend_from_slice(frame);
        }
        let resent = self.unacked.len() as u64;
        if !out.is_empty() {
            if let Err(error) = conn.write_all(&out).await {
                return SessionEnd::Lost(format!("write: {error}"));
            }
            Counters::add(&run.counters.resent, resent);
            out.clear();
        }
        let mut replies = Vec::new();
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            self.check_done(plan);
            if self.done_sending && (!plan.ack || self.unacked.is_empty()) {
                return SessionEnd::Finished;
            }
            let can_send =
                !self.done_sending && (!plan.ack || self.unacked.len() < plan.model.window);
            let due = self
                .pacer
                .next_due(Instant::now(), self.send_until)
                .unwrap_or(self.send_until);
            tokio::select! {
                biased;
                () = run.cancel.cancelled() => return SessionEnd::Finished,
                read = conn.read(&mut chunk) => match read {
                    Ok(0) => return SessionEnd::Lost("closed by the gateway".to_owned()),
                    Err(error) => return SessionEnd::Lost(format!("read: {error}")),
                    Ok(n) => {
                        replies.extend_from_slice(&chunk[..n]);
                        if let Err(error) = self.handle_replies(plan, run, &mut replies, &mut out) {
                            return SessionEnd::Lost(error);
                        }
                    }
                },
                () = sleep_until(due), if can_send => self.fill(plan, run, &mut out),
                () = sleep_until(self.give_up_at) => return SessionEnd::Finished,
            }
            if !out.is_empty() {
                if let Err(error) = conn.write_all(&out).await {
                    return SessionEnd::Lost(format!("write: {error}"));
                }
                out.clear();
            }
        }
    }

    /// Renders every message that is due (within the batch and window limits) into `out`.
    fn fill(&mut self, plan: &TcpPlan, run: &RunShared, out: &mut Vec<u8>) {
        let now = Instant::now();
        let limit = if plan.ack {
            plan.model.window.saturating_sub(self.unacked.len())
        } else if self.pacer.unpaced() {
            UNPACED_BATCH
        } else {
            CATCH_UP_BATCH
        };
        let mut sent = 0u64;
        for _ in 0..limit {
            if self.seq >= plan.model.messages {
                self.done_sending = true;
                break;
            }
            match self.pacer.next_due(now, self.send_until) {
                None => {
                    self.done_sending = true;
                    break;
                }
                Some(due) if due > now => break,
                Some(_) => {}
            }
            self.seq += 1;
            // Bumped before the write, so the subscriber never sees a seq it does not know about.
            run.seqs.set(self.slot, self.seq);
            let frame_start = out.len();
            let header = plan.framing.begin(out);
            let walk = self.walk.step(&mut self.rng);
            let vars = Vars {
                device: &self.id,
                seq: self.seq,
                send_us: stats::now_us(),
                walk,
                rand: self.rng.f64(),
            };
            plan.model.template.render(&vars, out);
            plan.framing.finish(out, header);
            if plan.ack {
                self.unacked
                    .push_back((self.seq, out[frame_start..].to_vec()));
            }
            self.pacer.advance(&mut self.rng);
            sent += 1;
        }
        if sent > 0 {
            Counters::add(&run.counters.sent, sent);
            run.counters.note_send(now - run.start);
        }
    }

    /// Acts on every complete reply frame in `buf`; queues command results into `out`.
    fn handle_replies(
        &mut self,
        plan: &TcpPlan,
        run: &RunShared,
        buf: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        while let Some(frame) = plan.framing.next_frame(buf).map_err(|e| e.to_string())? {
            let reply: Reply = match serde_json::from_slice(&frame) {
                Ok(reply) => reply,
                Err(error) => {
                    run.errors.record("bad_reply", || {
                        format!(
                            "{}: unparsable reply {:?}: {error}",
                            self.id,
                            String::from_utf8_lossy(&frame)
                        )
                    });
                    continue;
                }
            };
            match reply.kind.as_str() {
                "ack" => {
                    if let Some(seq) = reply.seq {
                        if let Some(pos) = self.unacked.iter().position(|(s, _)| *s == seq) {
                            self.unacked.remove(pos);
                            Counters::add(&run.counters.acked, 1);
                        }
                    }
                }
                "nack" => {
                    // The gateway refused to store it; report it rather than retry into a full buffer.
                    if let Some(pos) = reply
                        .seq
                        .and_then(|seq| self.unacked.iter().position(|(s, _)| *s == seq))
                    {
                        self.unacked.remove(pos);
                    }
                    Counters::add(&run.counters.nacked, 1);
                    run.errors.record("nack", || {
                        format!(
                            "{}: seq {:?} nacked: {}",
                            self.id,
                            reply.seq,
                            reply.reason.clone().unwrap_or_default()
                        )
                    });
                }
                "error" => {
                    Counters::add(&run.counters.gateway_errors, 1);
                    run.errors.record("gateway_error", || {
                        format!(
                            "{}: {}: {}",
                            self.id,
                            reply.code.clone().unwrap_or_default(),
                            reply.message.clone().unwrap_or_default()
                        )
                    });
                }
                "command" => {
                    Counters::add(&run.counters.commands, 1);
                    let id = reply
                        .id
                        .map_or_else(|| "null".to_owned(), |id| id.to_string());
                    let result = format!(
                        "{{\"type\":\"command_result\",\"id\":{id},\"status\":\"ok\",\"device\":{}}}",
                        json_string(&self.id)
                    );
                    plan.framing.encode(result.as_bytes(), out);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::io::{AsyncBufReadExt as _, BufReader};
    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::template::{DEFAULT_TEMPLATE, PayloadTemplate};
    use crate::tracker::DeviceIds;

    fn model(messages: u64, window: usize) -> DeviceModel {
        DeviceModel {
            ids: DeviceIds::new("dev", 1),
            rate: 0.0,
            jitter: 0.0,
            messages,
            duration: Duration::from_secs(10),
            window,
            ramp: 0.0,
            template: PayloadTemplate::parse(DEFAULT_TEMPLATE, 75).unwrap(),
            drain_timeout: Duration::from_secs(10),
        }
    }

    /// A fake gateway (lines, ack mode) that drops the first connection after
    /// `drop_after` frames without acking them; returns every data seq it saw.
    async fn fake_gateway(
        listener: TcpListener,
        drop_after: usize,
    ) -> (BTreeMap<u64, u32>, Vec<String>) {
        let mut seen = BTreeMap::new();
        let mut hellos = Vec::new();
        let mut connection = 0;
        loop {
            let Ok(Ok((stream, _))) = timeout(Duration::from_millis(500), listener.accept()).await
            else {
                return (seen, hellos);
            };
            connection += 1;
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let mut frames = 0;
            while let Ok(Some(line)) = lines.next_line().await {
                let value: serde_json::Value = serde_json::from_str(&line).unwrap();
                if value["type"] == "hello" {
                    hellos.push(value["device"].as_str().unwrap().to_owned());
                    write
                        .write_all(b"{\"type\":\"welcome\",\"device\":\"dev-1\"}\n")
                        .await
                        .unwrap();
                    continue;
                }
                let seq = value["seq"].as_u64().unwrap();
                *seen.entry(seq).or_insert(0) += 1;
                frames += 1;
                if connection == 1 && frames == drop_after {
                    break; // drop the connection with this frame (and any in flight) unacked
                }
                write
                    .write_all(format!("{{\"type\":\"ack\",\"seq\":{seq}}}\n").as_bytes())
                    .await
                    .unwrap();
            }
        }
    }

    #[tokio::test]
    async fn ack_mode_resends_unacked_messages_after_a_reconnect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let gateway = tokio::spawn(fake_gateway(listener, 5));
        let plan = Arc::new(TcpPlan {
            model: model(20, 4),
            connector: Connector::new(&target, None, false).await.unwrap(),
            framing: Framing::Lines,
            hello: true,
            tokens: HelloTokens::default(),
            ack: true,
        });
        let run = Arc::new(RunShared::new(1, CancellationToken::new()));
        device(Arc::clone(&plan), Arc::clone(&run), 0).await;
        let (seen, hellos) = gateway.await.unwrap();

        assert_eq!(Counters::get(&run.counters.sent), 20);
        assert_eq!(Counters::get(&run.counters.acked), 20);
        assert!(Counters::get(&run.counters.resent) >= 1);
        assert_eq!(Counters::get(&run.counters.disconnects), 1);
        assert_eq!(run.seqs.get(0), 20);
        assert_eq!(
            seen.keys().copied().collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>()
        );
        assert_eq!(seen[&5], 2, "the dropped frame was sent again");
        assert_eq!(
            hellos,
            vec!["dev-1", "dev-1"],
            "a hello on every connection"
        );
    }

    #[tokio::test]
    async fn length_prefixed_frames_and_connect_failures_are_counted() {
        // Bind then drop: nothing listens on this port, so connecting fails fast.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let mut model = model(3, 4);
        model.duration = Duration::from_millis(300);
        model.drain_timeout = Duration::from_millis(300);
        let plan = Arc::new(TcpPlan {
            model,
            connector: Connector::new(&port.to_string(), None, false)
                .await
                .unwrap(),
            framing: Framing::LengthPrefixed,
            hello: false,
            tokens: HelloTokens::default(),
            ack: false,
        });
        let run = Arc::new(RunShared::new(1, CancellationToken::new()));
        device(Arc::clone(&plan), Arc::clone(&run), 0).await;
        assert!(Counters::get(&run.counters.connect_failures) >= 1);
        assert_eq!(Counters::get(&run.counters.sent), 0);
        assert!(
            run.errors.snapshot()["connect"]
                .first
                .contains("dev-1: connect to 127.0.0.1:")
        );
    }
}
