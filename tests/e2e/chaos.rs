//! The short chaos run: a few SIGKILLs at random moments and an extra enricher and rater
//! member added and removed, the bill still exact (the long run: `chaos`, RELIABILITY.md).

use meterflow_tests::chaos::{run, Chaos};

#[test]
fn a_short_chaos_run_with_kills_and_members_coming_and_going_settles_to_the_cent() {
    let report = run(&Chaos {
        instances: 9,
        polls: 2 * 288 + 1,
        kills: 6,
        speed: 5_000,
        seed: 42,
        extra_members: true,
        drain_secs: 300,
        storage: "memory://tansu/".into(),
        broker_restarts: 0,
        settler_extra: String::new(),
    });
    report.print();
    assert!(report.passed(), "{report:#?}");
    assert_eq!(
        report
            .faults
            .iter()
            .filter(|f| f.contains("SIGKILL"))
            .count(),
        6
    );
    assert!(report.faults.iter().any(|f| f.contains("added")));
    assert!(report.faults.iter().any(|f| f.contains("removed")));
}
