//! The only crate that knows Avro. Every record travels as Avro single-object encoding
//! (`C3 01`, the schema's 8-byte CRC-64-AVRO fingerprint, then the datum), so a consumer
//! can tell which schema a message claims before decoding it, and reject the rest with a
//! reason code instead of guessing.

use apache_avro::{rabin::Rabin, Schema};
use meterflow_types::*;
use std::sync::{Mutex, OnceLock};

mod convert;
#[doc(hidden)]
pub mod fast;
pub use convert::Record;

/// Wire schemas, compiled in from `schemas/*.avsc`.
pub mod schemas {
    pub const SAMPLE: &str = include_str!("../../../schemas/sample.avsc");
    pub const NODE_HEARTBEAT: &str = include_str!("../../../schemas/node_heartbeat.avsc");
    pub const INSTANCE: &str = include_str!("../../../schemas/instance.avsc");
    pub const OWNERSHIP: &str = include_str!("../../../schemas/ownership.avsc");
    pub const USAGE: &str = include_str!("../../../schemas/usage.avsc");
    pub const RATED: &str = include_str!("../../../schemas/rated.avsc");
    pub const WATERMARK: &str = include_str!("../../../schemas/watermark.avsc");
    pub const DLQ: &str = include_str!("../../../schemas/dlq.avsc");
    pub const RATER_CHECKPOINT: &str = include_str!("../../../schemas/rater_checkpoint.avsc");
    pub const SETTLEMENT: &str = include_str!("../../../schemas/settlement.avsc");
    pub const RATER_TO_DATE: &str = include_str!("../../../schemas/rater_to_date.avsc");
    pub const RATER_CLOSED_WINDOW: &str = include_str!("../../../schemas/rater_closed_window.avsc");
    pub const ENRICHER_CHECKPOINT: &str = include_str!("../../../schemas/enricher_checkpoint.avsc");
    pub const RULE_SET: &str = include_str!("../../../schemas/rule_set.avsc");
    pub const SETTLER_PROGRESS: &str = include_str!("../../../schemas/settler_progress.avsc");
    pub const METERING_REQUEST: &str = include_str!("../../../schemas/metering_request.avsc");
    pub const METERING_REPLY: &str = include_str!("../../../schemas/metering_reply.avsc");
    pub const AUDIT_COUNT: &str = include_str!("../../../schemas/audit_count.avsc");
    pub const PROBE_SPEC: &str = include_str!("../../../schemas/probe_spec.avsc");
}

/// Messages larger than this are refused before decoding (reason `oversized`).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    Oversized(usize),
    #[error("not Avro single-object encoding (missing C3 01 header)")]
    NoHeader,
    #[error("schema fingerprint {0} is not one this stage accepts")]
    UnknownSchema(String),
    #[error("undecodable {schema} datum: {detail}")]
    Undecodable {
        schema: &'static str,
        detail: String,
    },
    #[error("invalid value in {schema}: {detail}")]
    InvalidValue {
        schema: &'static str,
        detail: String,
    },
}

impl DecodeError {
    /// Stable reason code for the dead-letter topic.
    pub fn reason_code(&self) -> &'static str {
        match self {
            DecodeError::Oversized(_) => "oversized",
            DecodeError::NoHeader => "undecodable",
            DecodeError::UnknownSchema(_) => "wrong_schema",
            DecodeError::Undecodable { .. } => "undecodable",
            DecodeError::InvalidValue { .. } => "invalid_value",
        }
    }
}

#[doc(hidden)]
pub struct Compiled {
    pub schema: Schema,
    pub header: [u8; 10],
    /// The schema resolved once (apache-avro's `to_avro_datum`/`from_avro_datum` resolve
    /// it again on every call: a tenth of the enricher's time went there).
    reader: apache_avro::GenericSingleObjectReader,
    writer: Mutex<apache_avro::GenericSingleObjectWriter>,
}

/// Our header, for apache-avro's single-object reader and writer.
struct Header([u8; 10]);

impl apache_avro::headers::HeaderBuilder for Header {
    fn build_header(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

fn compile(json: &str) -> Compiled {
    // apache-avro reserves room for a length it reads before reading the items, bounded
    // only by its allocation limit (default 512 Mi *items*: a ten-byte datum claiming an
    // array asked for 21 GB and aborted the process; found by the fuzz targets). No
    // string, byte run or item count in a message can exceed the message's own size.
    // Process-wide and set once; every decode compiles its type first, so it is in force
    // before any datum is read (this crate is the process's only Avro decoder).
    apache_avro::util::max_allocation_bytes(MAX_MESSAGE_BYTES);
    // The schemas are compiled into the binary and checked by the tests below.
    #[allow(clippy::expect_used)]
    let schema = Schema::parse_str(json).expect("embedded schema parses");
    let fp = schema.fingerprint::<Rabin>();
    let mut header = [0u8; 10];
    header[0] = 0xC3;
    header[1] = 0x01;
    header[2..10].copy_from_slice(&fp.bytes[..8]);
    #[allow(clippy::expect_used)]
    let reader = apache_avro::GenericSingleObjectReader::new_with_header_builder(
        schema.clone(),
        Header(header),
    )
    .expect("embedded schema resolves");
    #[allow(clippy::expect_used)]
    let writer = apache_avro::GenericSingleObjectWriter::new_with_capacity_and_header_builder(
        &schema,
        256,
        Header(header),
    )
    .expect("embedded schema resolves");
    Compiled {
        schema,
        header,
        reader,
        writer: Mutex::new(writer),
    }
}

macro_rules! compiled {
    ($fn:ident, $json:expr) => {
        pub(crate) fn $fn() -> &'static Compiled {
            static C: OnceLock<Compiled> = OnceLock::new();
            C.get_or_init(|| compile($json))
        }
    };
}
compiled!(sample_c, schemas::SAMPLE);
compiled!(node_heartbeat_c, schemas::NODE_HEARTBEAT);
compiled!(instance_c, schemas::INSTANCE);
compiled!(ownership_c, schemas::OWNERSHIP);
compiled!(usage_c, schemas::USAGE);
compiled!(rated_c, schemas::RATED);
compiled!(watermark_c, schemas::WATERMARK);
compiled!(dlq_c, schemas::DLQ);
compiled!(rater_checkpoint_c, schemas::RATER_CHECKPOINT);
compiled!(enricher_checkpoint_c, schemas::ENRICHER_CHECKPOINT);
compiled!(rater_to_date_c, schemas::RATER_TO_DATE);
compiled!(rater_closed_window_c, schemas::RATER_CLOSED_WINDOW);
compiled!(settlement_c, schemas::SETTLEMENT);
compiled!(rule_set_c, schemas::RULE_SET);
compiled!(settler_progress_c, schemas::SETTLER_PROGRESS);
compiled!(metering_request_c, schemas::METERING_REQUEST);
compiled!(metering_reply_c, schemas::METERING_REPLY);
compiled!(audit_count_c, schemas::AUDIT_COUNT);
compiled!(probe_spec_c, schemas::PROBE_SPEC);

/// Encode one record as Avro single-object encoding.
pub fn encode<R: Record>(r: &R) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    encode_into(r, &mut out);
    out
}

/// Encode one record as Avro single-object encoding, appended to `out` (a buffer reused
/// across records saves an allocation each).
pub fn encode_into<R: Record>(r: &R, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&R::compiled().header);
    if r.write_datum(&mut fast::Writer { out }) {
        return;
    }
    out.truncate(start);
    out.extend_from_slice(&generic::encode(r));
}

/// A usage record encoded from its view (single-object encoding, appended to `out`): the
/// same bytes as `encode_into` of the `Usage` it stands for.
pub fn encode_usage_into(u: &meterflow_types::UsageView<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(&<meterflow_types::Usage as Record>::compiled().header);
    convert::write_usage(u, &mut fast::Writer { out });
}

/// apache-avro's `Value` path for every record type: the codec of the types without a
/// direct one, and the reference the direct codec is tested against.
#[doc(hidden)]
pub mod generic {
    use super::*;

    pub fn encode<R: Record>(r: &R) -> Vec<u8> {
        let c = R::compiled();
        let value = r.to_value();
        let mut out = Vec::with_capacity(256);
        // A value built by `to_value` always matches its own schema (tested); the writer
        // holds no state between calls, so a panic elsewhere cannot leave it poisoned in
        // a way that matters.
        #[allow(clippy::expect_used)]
        c.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .write_value_ref(&value, &mut out)
            .expect("record matches its schema");
        out
    }

    pub fn decode<R: Record>(bytes: &[u8]) -> Result<R, DecodeError> {
        let body = check_header(bytes, R::compiled())?;
        decode_body::<R>(body)
    }
}

/// The 10-byte single-object header (marker + schema fingerprint) of a record type.
pub fn header_of<R: Record>() -> [u8; 10] {
    R::compiled().header
}

/// Decode a record of a known type.
pub fn decode<R: Record>(bytes: &[u8]) -> Result<R, DecodeError> {
    let body = check_header(bytes, R::compiled())?;
    let mut r = fast::Reader::new(R::NAME, body);
    match R::read_datum(&mut r) {
        Some(rec) => {
            let rec = rec?;
            r.finish()?;
            Ok(rec)
        }
        None => decode_body::<R>(body),
    }
}

fn check_header<'a>(bytes: &'a [u8], c: &Compiled) -> Result<&'a [u8], DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::Oversized(bytes.len()));
    }
    if bytes.len() < 10 || bytes[0] != 0xC3 || bytes[1] != 0x01 {
        return Err(DecodeError::NoHeader);
    }
    if bytes[..10] != c.header {
        return Err(DecodeError::UnknownSchema(hex(&bytes[2..10])));
    }
    Ok(&bytes[10..])
}

fn decode_body<R: Record>(datum: &[u8]) -> Result<R, DecodeError> {
    let c = R::compiled();
    // apache-avro 0.21 reads a union whose bytes are missing at the end of the input as
    // null, so a truncated datum could "decode". Decoding from the datum plus one
    // sentinel byte tells: a whole datum leaves exactly the sentinel unread; a truncated
    // one eats into it.
    let mut buf = Vec::with_capacity(10 + datum.len() + 1);
    buf.extend_from_slice(&c.header);
    buf.extend_from_slice(datum);
    buf.push(0);
    let mut body = &buf[..];
    let v = c
        .reader
        .read_value(&mut body)
        .map_err(|e| DecodeError::Undecodable {
            schema: R::NAME,
            detail: e.to_string(),
        })?;
    match body.len() {
        1 => {}
        0 => {
            return Err(DecodeError::Undecodable {
                schema: R::NAME,
                detail: format!("truncated after {} bytes", datum.len()),
            })
        }
        n => {
            return Err(DecodeError::Undecodable {
                schema: R::NAME,
                detail: format!("{} trailing bytes", n - 1),
            })
        }
    }
    R::from_value(v)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What may appear on the samples topic. (Samples vastly outnumber heartbeats, and a
/// message is consumed at once: boxing the large variant would only add an allocation.)
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum SamplesMsg {
    Sample(Sample),
    Heartbeat(NodeHeartbeat),
}
/// `SamplesMsg`, its sample a view of the message's bytes (`decode_samples_view`).
#[derive(Debug, Clone, PartialEq)]
pub enum SamplesViewMsg<'a> {
    Sample(SampleView<'a>),
    Heartbeat(NodeHeartbeat),
}
/// What may appear on the usage topic (usage vastly outnumbers markers; see above).
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum UsageMsg {
    Usage(Usage),
    Watermark(Watermark),
}
/// `UsageMsg`, its usage a view of the message's bytes (`decode_usage_view`).
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum UsageViewMsg<'a> {
    Usage(UsageView<'a>),
    Watermark(Watermark),
}
/// What may appear on the instances topic: instance state, and node rows.
#[derive(Debug, Clone, PartialEq)]
pub enum InstancesMsg {
    Instance(InstanceState),
    Node(NodeHeartbeat),
}
/// What may appear on the rated topic.
#[derive(Debug, Clone, PartialEq)]
pub enum RatedMsg {
    Rated(RatedEvent),
    Watermark(Watermark),
}

fn dispatch2<A: Record, B: Record>(bytes: &[u8]) -> Result<Result<A, B>, DecodeError> {
    if bytes.len() >= 10 && bytes[..10] == B::compiled().header {
        return decode::<B>(bytes).map(Err);
    }
    decode::<A>(bytes).map(Ok)
}

pub fn decode_samples_msg(bytes: &[u8]) -> Result<SamplesMsg, DecodeError> {
    Ok(match dispatch2::<Sample, NodeHeartbeat>(bytes)? {
        Ok(s) => SamplesMsg::Sample(s),
        Err(h) => SamplesMsg::Heartbeat(h),
    })
}
/// A samples-topic message as `decode_samples_msg` reads it, with the sample a view of
/// `bytes` (its text borrowed): the enricher's decoder, allocating nothing per sample.
/// The same checks, the same errors.
pub fn decode_samples_view(bytes: &[u8]) -> Result<SamplesViewMsg<'_>, DecodeError> {
    if bytes.len() >= 10 && bytes[..10] == NodeHeartbeat::compiled().header {
        return decode::<NodeHeartbeat>(bytes).map(SamplesViewMsg::Heartbeat);
    }
    let body = check_header(bytes, Sample::compiled())?;
    let mut r = fast::Reader::new(Sample::NAME, body);
    let s = convert::read_sample(&mut r)?;
    r.finish()?;
    Ok(SamplesViewMsg::Sample(s))
}
pub fn decode_usage_msg(bytes: &[u8]) -> Result<UsageMsg, DecodeError> {
    Ok(match dispatch2::<Usage, Watermark>(bytes)? {
        Ok(u) => UsageMsg::Usage(u),
        Err(w) => UsageMsg::Watermark(w),
    })
}
/// A usage-topic message as `decode_usage_msg` reads it, with the usage record a view of
/// `bytes` (text fields borrowed; labels kept only if `keep_labels`): what a reader that
/// keeps few records whole decodes, allocating nothing for the rest. The same checks,
/// the same errors.
pub fn decode_usage_view(bytes: &[u8], keep_labels: bool) -> Result<UsageViewMsg<'_>, DecodeError> {
    if bytes.len() >= 10 && bytes[..10] == Watermark::compiled().header {
        return decode::<Watermark>(bytes).map(UsageViewMsg::Watermark);
    }
    let body = check_header(bytes, Usage::compiled())?;
    let mut r = fast::Reader::new(Usage::NAME, body);
    let u = convert::read_usage(&mut r, keep_labels)?;
    r.finish()?;
    Ok(UsageViewMsg::Usage(u))
}

pub fn decode_instances_msg(bytes: &[u8]) -> Result<InstancesMsg, DecodeError> {
    Ok(match dispatch2::<InstanceState, NodeHeartbeat>(bytes)? {
        Ok(s) => InstancesMsg::Instance(s),
        Err(h) => InstancesMsg::Node(h),
    })
}
pub fn decode_rated_msg(bytes: &[u8]) -> Result<RatedMsg, DecodeError> {
    Ok(match dispatch2::<RatedEvent, Watermark>(bytes)? {
        Ok(r) => RatedMsg::Rated(r),
        Err(w) => RatedMsg::Watermark(w),
    })
}

/// The schema of a record type, for tools and tests.
pub fn schema_of<R: Record>() -> &'static Schema {
    &R::compiled().schema
}

/// Whether a record's Avro value validates against its schema.
pub fn value_is_valid<R: Record>(r: &R) -> bool {
    r.to_value().validate(&R::compiled().schema)
}
