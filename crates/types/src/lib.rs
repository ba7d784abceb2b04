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
