//! Plain types shared by every meterflow stage, and the pure logic that defines the
//! numbers: decimal money, deterministic ids, counter deltas, window assignment with
//! pro-rata splitting, watermarks and billing periods. No I/O lives here.

pub mod decimal;
pub mod headers;
pub mod id;
pub mod interval;
pub mod records;
pub mod time;
pub mod watermark;
pub mod window;

pub use decimal::Dec;
pub use records::*;
pub use time::Millis;

/// A hash map for per-message lookups: foldhash (fast, seeded per process) instead of
/// SipHash, which was a tenth of the enricher's time.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The set of [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
