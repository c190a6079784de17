//! [`EventId`]: the id every event gets at receipt, so a consumer can drop duplicates.
//!
//! Layout (96 bits, big-endian): 48-bit Unix time in milliseconds, 16-bit sequence within
//! that millisecond, 32-bit random salt chosen once per process. Within a process the
//! first 64 bits strictly increase (a logical clock that never goes back, even when the
//! wall clock does), so two ids of one run never collide; across restarts two ids collide
//! only if they share the millisecond, the sequence number and the 32-bit salt. Written as
//! 20 characters of Crockford base32, which sort in time order.

use std::fmt;
use std::hash::BuildHasher as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Crockford's base32 alphabet: no I, L, O, U; sorts like the numbers it encodes.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters of the text form: 96 bits in 5-bit digits.
pub const EVENT_ID_TEXT_LEN: usize = 20;
/// Bits of the timestamp part.
const TIME_BITS: u32 = 48;

/// Last `time << 16 | sequence` handed out in this process.
static LAST_STAMP: AtomicU64 = AtomicU64::new(0);
/// This process's salt.
static SALT: OnceLock<u32> = OnceLock::new();

/// A gateway-wide unique event id, assigned once at receipt and stored with the event.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId([u8; 12]);

impl EventId {
    /// A new id, greater than every id this process made before.
    pub fn generate() -> Self {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| {
                u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
            })
            & ((1 << TIME_BITS) - 1);
        let floor = now_ms << (64 - TIME_BITS);
        let step = |last: u64| last.saturating_add(1).max(floor);
        // The closure always returns Some, so fetch_update cannot fail; both arms agree.
        let stamp = match LAST_STAMP.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(step(last))
        }) {
            Ok(last) | Err(last) => step(last),
        };
        let salt = *SALT.get_or_init(|| {
            // RandomState is seeded from the OS's randomness once per process.
            let random = std::hash::RandomState::new().hash_one(now_ms);
            u32::try_from(random >> 32).unwrap_or(u32::MAX)
        });
        Self::from_parts(stamp, salt)
    }

    /// An id from its 12 bytes (as stored in a buffer record).
    pub fn from_bytes(bytes: [u8; 12]) -> Self {
        Self(bytes)
    }

    /// The id's 12 bytes.
    pub fn to_bytes(self) -> [u8; 12] {
        self.0
    }

    /// The id of a record written before events carried ids: derived from the record's
    /// bytes and receipt time, so it is the same on every redelivery of that record.
    pub(crate) fn legacy(record: &[u8], received_at_ms: u64) -> Self {
        // FNV-1a: tiny and deterministic across builds (std's hashers are not).
        let hash = record.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let time = received_at_ms & ((1 << TIME_BITS) - 1);
        let stamp = time << (64 - TIME_BITS) | (hash & 0xffff);
        Self::from_parts(stamp, u32::try_from(hash >> 32).unwrap_or(u32::MAX))
    }

    fn from_parts(stamp: u64, salt: u32) -> Self {
        let mut bytes = [0u8; 12];
        bytes[..8].copy_from_slice(&stamp.to_be_bytes());
        bytes[8..].copy_from_slice(&salt.to_be_bytes());
        Self(bytes)
    }

    /// When the id was made, in milliseconds since the Unix epoch.
    pub fn timestamp_ms(self) -> u64 {
        let mut stamp = [0u8; 8];
        stamp.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(stamp) >> (64 - TIME_BITS)
    }

    /// The 20-character text form (what envelopes and MQTT user properties carry).
    pub fn to_text(self) -> [u8; EVENT_ID_TEXT_LEN] {
        // 96 bits, padded with 4 zero bits to 100 = 20 digits of 5 bits.
        let mut wide = [0u8; 16];
        wide[4..].copy_from_slice(&self.0);
        let value = u128::from_be_bytes(wide) << 4;
        let mut text = [0u8; EVENT_ID_TEXT_LEN];
        for (index, digit) in text.iter_mut().enumerate() {
            let shift = 95 - 5 * index;
            *digit = ALPHABET[usize::from(u8::try_from((value >> shift) & 0x1f).unwrap_or(0))];
        }
        text
    }

    /// Parses the text form; `None` for anything [`to_text`](Self::to_text) does not make.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != EVENT_ID_TEXT_LEN {
            return None;
        }
        let mut value: u128 = 0;
        for byte in text.bytes() {
            let digit = ALPHABET.iter().position(|c| *c == byte)?;
            value = value << 5 | u128::try_from(digit).ok()?;
        }
        if value & 0xf != 0 {
            return None;
        }
        let bytes = (value >> 4).to_be_bytes();
        let mut id = [0u8; 12];
        id.copy_from_slice(&bytes[4..]);
        Some(Self(id))
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.to_text();
        // The alphabet is ASCII, so this never fails.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ids_increase_and_never_repeat_across_threads() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..20_000).map(|_| EventId::generate()).collect::<Vec<_>>())
            })
            .collect();
        let mut seen = HashSet::new();
        for thread in threads {
            let ids = thread.join().unwrap();
            assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
            for id in ids {
                assert!(seen.insert(id), "duplicate {id}");
            }
        }
    }

    #[test]
    fn carries_the_time_it_was_made() {
        let before = u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        let id = EventId::generate();
        // The logical clock may run ahead of the wall clock by the ids made per ms.
        assert!(id.timestamp_ms() >= before, "{id}: {}", id.timestamp_ms());
        assert!(id.timestamp_ms() < before + 60_000, "{id}");
    }

    #[test]
    fn text_form_round_trips_and_sorts_like_the_id() {
        let ids: Vec<EventId> = (0..1000).map(|_| EventId::generate()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0].to_string() < pair[1].to_string());
        }
        for id in ids {
            let text = id.to_string();
            assert_eq!(text.len(), EVENT_ID_TEXT_LEN);
            assert_eq!(EventId::parse(&text), Some(id));
        }
        let max = EventId::from_bytes([0xff; 12]);
        assert_eq!(EventId::parse(&max.to_string()), Some(max));
        assert_eq!(EventId::parse("0000000000000000000I"), None);
        assert_eq!(
            EventId::parse("ZZZZZZZZZZZZZZZZZZZZ"),
            None,
            "low pad bits set"
        );
        assert_eq!(EventId::parse("short"), None);
    }

    #[test]
    fn legacy_ids_are_deterministic() {
        let a = EventId::legacy(b"record", 1_764_143_349_123);
        assert_eq!(a, EventId::legacy(b"record", 1_764_143_349_123));
        assert_ne!(a, EventId::legacy(b"record2", 1_764_143_349_123));
        assert_eq!(a.timestamp_ms(), 1_764_143_349_123);
    }
}
