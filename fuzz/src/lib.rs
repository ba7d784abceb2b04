//! What every fuzz target checks of a decoder: any bytes give a record or a
//! `DecodeError` with a reason code (never a panic, an endless loop or an allocation the
//! size of a claimed length), and a record that decodes encodes to bytes that decode to
//! the same record.
//!
//! Each input is tried twice: as the whole message (the header check and dispatch), and
//! as the datum after a valid header of one of the topic's record types, chosen by the
//! first byte (so the fuzzer reaches the Avro datum decoder without guessing a schema
//! fingerprint first).
//!
//! The hot record types (samples, heartbeats, instance states, usage, watermarks, revenue
//! events) have a direct codec besides apache-avro's: every input is also decoded by
//! both, which must give the same record or the same reason code, and every record that
//! decodes must decode the same way from either encoder's bytes.

use meterflow_avro::{decode, encode, generic, header_of, DecodeError, Record};
use meterflow_avro::{InstancesMsg, RatedMsg, SamplesMsg, SamplesViewMsg, UsageMsg, UsageViewMsg};
use meterflow_types::{InstanceState, NodeHeartbeat, RatedEvent, Sample, Usage, Watermark};
use std::fmt::Debug;

fn roundtrip<R: Record + PartialEq + Debug>(r: &R) {
    let again = decode::<R>(&encode(r)).expect("an encoded record decodes");
    assert_eq!(&again, r, "the record changed through encode and decode");
    let by_apache = generic::decode::<R>(&encode(r)).expect("apache-avro decodes it too");
    assert_eq!(&by_apache, r, "apache-avro reads the record differently");
    let from_apache = decode::<R>(&generic::encode(r)).expect("apache-avro's bytes decode");
    assert_eq!(&from_apache, r, "apache-avro's bytes decode differently");
}

/// The direct codec and apache-avro agree on `m` as an `R`.
fn agree<R: Record + PartialEq + Debug>(m: &[u8]) {
    match (decode::<R>(m), generic::decode::<R>(m)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the decoders read different records"),
        (Err(a), Err(b)) => assert_eq!(a.reason_code(), b.reason_code(), "direct {a} / apache-avro {b}"),
        (a, b) => panic!("direct {a:?} / apache-avro {b:?}"),
    }
}

fn check<T>(decoded: Result<T, DecodeError>, on_record: impl FnOnce(T)) {
    match decoded {
        Ok(m) => on_record(m),
        Err(e) => assert!(!e.reason_code().is_empty()),
    }
}

/// `data` as is, and its tail after `headers[data[0] % n]`.
fn both(data: &[u8], headers: &[[u8; 10]], mut f: impl FnMut(&[u8])) {
    f(data);
    if let Some((first, rest)) = data.split_first() {
        let mut msg = headers[usize::from(*first) % headers.len()].to_vec();
        msg.extend_from_slice(rest);
        f(&msg);
    }
}

/// A topic that carries one record type.
pub fn one<R: Record + PartialEq + Debug>(data: &[u8]) {
    both(data, &[header_of::<R>()], |m| {
        agree::<R>(m);
        check(decode::<R>(m), |r| roundtrip(&r))
    });
}

/// The samples topic (samples and node heartbeats).
pub fn samples(data: &[u8]) {
    let h = [header_of::<Sample>(), header_of::<NodeHeartbeat>()];
    both(data, &h, |m| {
        agree::<Sample>(m);
        agree::<NodeHeartbeat>(m);
        sample_views_agree(m);
        check(meterflow_avro::decode_samples_msg(m), |r| match r {
            SamplesMsg::Sample(r) => roundtrip(&r),
            SamplesMsg::Heartbeat(r) => roundtrip(&r),
        })
    });
}

/// The enricher's decoder (samples as views of the bytes) reads what the owned decoder
/// reads, or fails the same way.
fn sample_views_agree(m: &[u8]) {
    match (
        meterflow_avro::decode_samples_msg(m),
        meterflow_avro::decode_samples_view(m),
    ) {
        (Ok(SamplesMsg::Sample(a)), Ok(SamplesViewMsg::Sample(v))) => {
            assert_eq!(v.to_sample(), a, "the view reads a different sample")
        }
        (Ok(SamplesMsg::Heartbeat(a)), Ok(SamplesViewMsg::Heartbeat(b))) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("owned {a:?} / view {b:?}"),
    }
}

/// The usage topic (usage records and watermarks).
pub fn usage(data: &[u8]) {
    let h = [header_of::<Usage>(), header_of::<Watermark>()];
    both(data, &h, |m| {
        agree::<Usage>(m);
        agree::<Watermark>(m);
        views_agree(m);
        check(meterflow_avro::decode_usage_msg(m), |r| match r {
            UsageMsg::Usage(r) => roundtrip(&r),
            UsageMsg::Watermark(r) => roundtrip(&r),
        })
    });
}

/// The rater's decoder (usage as a view of the bytes) reads what the owned decoder
/// reads, or fails the same way; labels only when kept.
fn views_agree(m: &[u8]) {
    let owned = meterflow_avro::decode_usage_msg(m);
    for keep in [true, false] {
        match (&owned, meterflow_avro::decode_usage_view(m, keep)) {
            (Ok(UsageMsg::Usage(a)), Ok(UsageViewMsg::Usage(v))) => {
                let mut a = a.clone();
                if !keep {
                    a.labels.clear();
                }
                assert_eq!(v.into_usage(), a, "the view reads a different record");
            }
            (Ok(UsageMsg::Watermark(a)), Ok(UsageViewMsg::Watermark(b))) => assert_eq!(a, &b),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            (a, b) => panic!("owned {a:?} / view {b:?}"),
        }
    }
}

/// The instances topic (instance state and node rows).
pub fn instances(data: &[u8]) {
    let h = [header_of::<InstanceState>(), header_of::<NodeHeartbeat>()];
    both(data, &h, |m| {
        agree::<InstanceState>(m);
        agree::<NodeHeartbeat>(m);
        check(meterflow_avro::decode_instances_msg(m), |r| match r {
            InstancesMsg::Instance(r) => roundtrip(&r),
            InstancesMsg::Node(r) => roundtrip(&r),
        })
    });
}

/// The rated topic (revenue events and watermarks).
pub fn rated(data: &[u8]) {
    let h = [header_of::<RatedEvent>(), header_of::<Watermark>()];
    both(data, &h, |m| {
        agree::<RatedEvent>(m);
        agree::<Watermark>(m);
        check(meterflow_avro::decode_rated_msg(m), |r| match r {
            RatedMsg::Rated(r) => roundtrip(&r),
            RatedMsg::Watermark(r) => roundtrip(&r),
        })
    });
}
