//! The QoS 2 half of the MQTT session on disk, so exactly-once also holds across a gateway
//! crash: which buffer records travel under which packet id, and which step they reached.
//!
//! One small append-only text file per sink, `<data_dir>/sessions/<sink>.qos2`:
//! `S <id> <records>` (PUBLISH sent), `R <id>` (PUBREC received, PUBREL sent),
//! `C <id>` (PUBCOMP received, or refused: the records leave the buffer). Records are
//! written as `h<record id>` / `n<record id>` (lane), comma-separated.
//!
//! Ordering that makes it work: an `S` line reaches the OS before its PUBLISH reaches the
//! socket, an `R` line before its PUBREL, and a `C` line before the records are
//! acknowledged in the buffer. After a restart, a record whose `C` line exists is only
//! acknowledged (the buffer's ack may not have been synced), never sent again; records of
//! an unfinished publish are resent with DUP and the same packet id, or released.
//! A process crash (`kill -9`) loses nothing written to the OS; power loss may lose the
//! last lines, which degrades to at-least-once for those publishes.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use fieldgate_buffer::RecordId;
use fieldgate_core::Priority;

use super::session::Step;

/// The log is rewritten with only the live publishes beyond this size.
const COMPACT_BYTES: u64 = 4 * 1024 * 1024;

/// A buffer record: its lane and id.
pub type RecordRef = (Priority, RecordId);

/// A QoS 2 publish that had not completed when the log was last written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedPublish {
    /// Its step.
    pub step: Step,
    /// The records it carries.
    pub records: Vec<RecordRef>,
}

/// What the log says after a restart.
#[derive(Debug, Default)]
pub struct Restored {
    /// Unfinished publishes by packet id.
    pub inflight: BTreeMap<u16, LoggedPublish>,
    /// Records whose publish completed; their buffer ack may not be durable.
    pub completed: HashSet<RecordRef>,
}

/// The QoS 2 session log of one sink.
pub struct SessionLog {
    path: PathBuf,
    file: File,
    bytes: u64,
    pending: Vec<u8>,
    live: BTreeMap<u16, LoggedPublish>,
}

impl SessionLog {
    /// Opens (creating) the log at `path` and reads what it holds.
    pub fn open(path: &Path) -> std::io::Result<(Self, Restored)> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(err),
        };
        let restored = parse(&text);
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut log = Self {
            path: path.to_owned(),
            file,
            bytes: text.len() as u64,
            pending: Vec::new(),
            live: restored.inflight.clone(),
        };
        // Start from a compact file: a torn last line or old entries go now.
        log.rewrite(&restored.completed)?;
        Ok((log, restored))
    }

    /// A PUBLISH under `id` carrying `records` is about to be sent.
    pub fn sent(&mut self, id: u16, records: &[RecordRef]) {
        let mut line = format!("S {id} ");
        push_records(&mut line, records);
        line.push('\n');
        self.pending.extend_from_slice(line.as_bytes());
        self.live.insert(
            id,
            LoggedPublish {
                step: Step::Published,
                records: records.to_vec(),
            },
        );
    }

    /// PUBREC for `id` arrived; PUBREL is about to be sent.
    pub fn released(&mut self, id: u16) {
        if let Some(publish) = self.live.get_mut(&id) {
            publish.step = Step::Released;
            self.pending
                .extend_from_slice(format!("R {id}\n").as_bytes());
        }
    }

    /// The publish under `id` ended (completed or refused); its records leave the buffer.
    pub fn completed(&mut self, id: u16) {
        if self.live.remove(&id).is_some() {
            self.pending
                .extend_from_slice(format!("C {id}\n").as_bytes());
        }
    }

    /// The publish under `id` was refused: forget it without marking its records done.
    pub fn forget(&mut self, id: u16) {
        if self.live.remove(&id).is_some() {
            self.pending
                .extend_from_slice(format!("F {id}\n").as_bytes());
        }
    }

    /// Whether `id` is logged.
    #[cfg(test)]
    fn contains(&self, id: u16) -> bool {
        self.live.contains_key(&id)
    }

    /// Hands the pending lines to the OS (before the packets they describe are written).
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.pending)?;
        self.bytes += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Whether the log grew enough to be rewritten.
    pub fn wants_compaction(&self) -> bool {
        self.bytes > COMPACT_BYTES
    }

    /// Rewrites the log with only the unfinished publishes. Call it only once every
    /// completed record's buffer ack is durable (after a buffer sync).
    pub fn compact(&mut self) -> std::io::Result<()> {
        self.flush()?;
        self.rewrite(&HashSet::new())
    }

    fn rewrite(&mut self, completed: &HashSet<RecordRef>) -> std::io::Result<()> {
        let mut text = String::new();
        // Completed records are kept as one finished pseudo-publish under id 0 (never a
        // real packet id), so a crash before the buffer syncs still skips them.
        if !completed.is_empty() {
            let records: Vec<RecordRef> = completed.iter().copied().collect();
            text.push_str("S 0 ");
            push_records(&mut text, &records);
            text.push_str("\nC 0\n");
        }
        for (id, publish) in &self.live {
            text.push_str(&format!("S {id} "));
            push_records(&mut text, &publish.records);
            text.push('\n');
            if publish.step == Step::Released {
                text.push_str(&format!("R {id}\n"));
            }
        }
        let temporary = self.path.with_extension("qos2.tmp");
        std::fs::write(&temporary, text.as_bytes())?;
        std::fs::rename(&temporary, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.bytes = text.len() as u64;
        Ok(())
    }
}

fn push_records(out: &mut String, records: &[RecordRef]) {
    for (index, (lane, id)) in records.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        out.push(match lane {
            Priority::High => 'h',
            Priority::Normal => 'n',
        });
        out.push_str(&id.to_string());
    }
}

fn parse_records(text: &str) -> Option<Vec<RecordRef>> {
    text.split(',')
        .map(|record| {
            let lane = match record.as_bytes().first()? {
                b'h' => Priority::High,
                b'n' => Priority::Normal,
                _ => return None,
            };
            Some((lane, record.get(1..)?.parse().ok()?))
        })
        .collect()
}

/// Replays the log; a malformed or torn line is skipped.
fn parse(text: &[u8]) -> Restored {
    let mut inflight: BTreeMap<u16, LoggedPublish> = BTreeMap::new();
    let mut completed = HashSet::new();
    let text = String::from_utf8_lossy(text);
    // A line without its newline was torn by the crash: ignore it.
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    for line in whole.lines() {
        let mut parts = line.split(' ');
        let (Some(op), Some(id)) = (parts.next(), parts.next().and_then(|id| id.parse().ok()))
        else {
            continue;
        };
        match op {
            "S" => {
                if let Some(records) = parts.next().and_then(parse_records) {
                    inflight.insert(
                        id,
                        LoggedPublish {
                            step: Step::Published,
                            records,
                        },
                    );
                }
            }
            "R" => {
                if let Some(publish) = inflight.get_mut(&id) {
                    publish.step = Step::Released;
                }
            }
            "C" => {
                if let Some(publish) = inflight.remove(&id) {
                    completed.extend(publish.records);
                }
            }
            "F" => {
                inflight.remove(&id);
            }
            _ => {}
        }
    }
    Restored {
        inflight,
        completed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_sees_unfinished_publishes_and_completed_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sessions").join("cloud.qos2");
        let (mut log, restored) = SessionLog::open(&path).expect("opens");
        assert!(restored.inflight.is_empty());
        log.sent(5, &[(Priority::Normal, 10), (Priority::High, 3)]);
        log.sent(6, &[(Priority::Normal, 11)]);
        log.sent(7, &[(Priority::Normal, 12)]);
        log.released(6);
        log.completed(7);
        log.sent(8, &[(Priority::Normal, 13)]);
        log.forget(8);
        log.flush().expect("flushed");
        drop(log);
        let (log, restored) = SessionLog::open(&path).expect("reopens");
        assert_eq!(restored.inflight.len(), 2);
        assert_eq!(restored.inflight[&5].step, Step::Published);
        assert_eq!(
            restored.inflight[&5].records,
            vec![(Priority::Normal, 10), (Priority::High, 3)]
        );
        assert_eq!(restored.inflight[&6].step, Step::Released);
        assert!(restored.completed.contains(&(Priority::Normal, 12)));
        assert!(
            !restored.completed.contains(&(Priority::Normal, 13)),
            "refused is not done"
        );
        assert!(log.contains(5) && log.contains(6) && !log.contains(7));
        // Reopening again (after the rewrite) gives the same picture.
        drop(log);
        let (_, again) = SessionLog::open(&path).expect("reopens");
        assert_eq!(again.inflight, restored.inflight);
        assert_eq!(again.completed, restored.completed);
    }

    #[test]
    fn a_torn_or_garbled_line_is_ignored() {
        let restored = parse(b"S 1 n1\nS 2 x9\nQ 3\nR 1\nS 4 n2,h");
        assert_eq!(restored.inflight.len(), 1);
        assert_eq!(restored.inflight[&1].step, Step::Released);
        let restored = parse(b"S 1 n1\nC 1");
        assert_eq!(restored.inflight.len(), 1, "torn C line ignored");
    }

    #[test]
    fn compaction_keeps_only_unfinished_publishes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cloud.qos2");
        let (mut log, _) = SessionLog::open(&path).expect("opens");
        for id in 1..200u16 {
            log.sent(id, &[(Priority::Normal, u64::from(id))]);
            if id != 150 {
                log.completed(id);
            }
        }
        log.compact().expect("compacts");
        drop(log);
        let (_, restored) = SessionLog::open(&path).expect("reopens");
        assert_eq!(
            restored.inflight.keys().copied().collect::<Vec<_>>(),
            vec![150]
        );
        assert!(restored.completed.is_empty());
    }
}
