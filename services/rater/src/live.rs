//! A scan that reads its table's contents when it runs, not when it is planned.
//!
//! A rule's physical plan is then made once and run again for every window (after
//! `reset_plan_states`, which gives joins, repartitions and sorts fresh state): making
//! it — the physical planner and its optimizer passes — was a third of the rater's main
//! loop when windows close often (BENCHMARKS.md, session 15). The scan reports no
//! statistics, so no optimizer pass can fold a count, minimum or maximum of one
//! window's rows into the plan that the next window runs.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions,
};
use std::sync::Arc;

/// The table's current batches, already projected to the scan's schema.
pub type Read = Arc<dyn Fn() -> datafusion::error::Result<Vec<RecordBatch>> + Send + Sync>;

/// One partition of whatever `read` returns when the plan runs.
pub struct LiveScan {
    table: &'static str,
    schema: SchemaRef,
    read: Read,
    cache: Arc<PlanProperties>,
}

impl LiveScan {
    pub fn new(table: &'static str, schema: SchemaRef, read: Read) -> LiveScan {
        let cache = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        LiveScan {
            table,
            schema,
            read,
            cache,
        }
    }
}

impl std::fmt::Debug for LiveScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveScan({})", self.table)
    }
}

impl DisplayAs for LiveScan {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveScan: {}", self.table)
    }
}

impl ExecutionPlan for LiveScan {
    fn name(&self) -> &'static str {
        "LiveScan"
    }
    fn properties(&self) -> &Arc<PlanProperties> {
        &self.cache
    }
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }
    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::error::Result<TreeNodeRecursion>,
    ) -> datafusion::error::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }
    fn replace_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }
    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }
    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> datafusion::error::Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(datafusion::error::DataFusionError::Internal(format!(
                "LiveScan({}) has one partition, not {partition}",
                self.table
            )));
        }
        Ok(Box::pin(MemoryStream::try_new(
            (self.read)()?,
            self.schema.clone(),
            None,
        )?))
    }
}
