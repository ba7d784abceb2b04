//! Inputs the fuzz targets (fuzz/) found, kept as tests. Each file is a fuzz input: its
//! first byte chose the header that the target put before the rest.

use meterflow_avro::{decode, header_of, DecodeError, Record};
use meterflow_types::{RuleSet, Usage};

fn message<R: Record>(input: &[u8]) -> Vec<u8> {
    let mut m = header_of::<R>().to_vec();
    m.extend_from_slice(&input[1..]);
    m
}

/// A datum of a few bytes claiming a collection of hundreds of millions of items: refused
/// by the allocation limit (the message's own size), not reserved (21 GB for the usage
/// input, which aborted the process under the fuzzer's memory limit).
/// Both decoders are tried: apache-avro's (every type; its allocation limit) and, for the
/// hot types, the direct codec (which checks a claimed count against the message size).
fn refused_by_the_allocation_limit<R: Record + std::fmt::Debug>(input: &[u8], direct: &str) {
    let m = message::<R>(input);
    for (decoded, says) in [
        (
            meterflow_avro::generic::decode::<R>(&m),
            "Unable to allocate",
        ),
        (decode::<R>(&m), direct),
    ] {
        match decoded {
            Err(e @ DecodeError::Undecodable { .. }) => {
                assert!(e.to_string().contains(says), "{e}");
                assert_eq!(e.reason_code(), "undecodable");
            }
            other => panic!("expected a refusal by the allocation limit, got {other:?}"),
        }
    }
}

#[test]
fn a_usage_datum_claiming_a_huge_map_is_refused_without_reserving_it() {
    refused_by_the_allocation_limit::<Usage>(
        include_bytes!("fuzz-regressions/usage-oom"),
        "exceeds the message size",
    );
}

#[test]
fn a_rule_set_datum_claiming_a_huge_array_is_refused_without_reserving_it() {
    refused_by_the_allocation_limit::<RuleSet>(
        include_bytes!("fuzz-regressions/rules-oom"),
        "Unable to allocate",
    );
}
