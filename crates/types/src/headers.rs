//! Kafka header names meterflow writes, shared by the stages that write and read them.

/// On an instance tombstone (`meterflow.instances`): the node that saw the instance go.
/// A reader keeps the instance if its latest registration is from another node (it
/// migrated there).
pub const DELETED_BY: &str = "meterflow-deleted-by";
/// On a parked-usage record (`meterflow.parked`): the enricher member that parked it.
pub const PARKED_BY: &str = "meterflow-parked-by";
/// On a parked-usage record: wall-clock milliseconds when it was parked.
pub const PARKED_AT: &str = "meterflow-parked-at";
/// On a parked-usage record: what the join waits for, `owner` (no owner known for the
/// interval) or `instance` (the instance's registration, with its labels and flavor, not
/// read yet).
pub const PARKED_FOR: &str = "meterflow-parked-for";
/// On a parked-usage tombstone: the entity the usage finally went to.
pub const RELEASED_TO: &str = "meterflow-released-to";
