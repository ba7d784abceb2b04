/// mimalloc, not glibc's malloc: the enricher builds records on its batch-preparing
/// threads and drops them on its main loop, which glibc serves through per-thread arenas
/// and repeated consolidation — about a third of the main loop's time. With mimalloc the
/// enricher takes about a third less CPU on the stage benchmark (BENCHMARKS.md). The
/// rater and settler stay on glibc: under mimalloc the rater's peak memory grew a fifth
/// with ten times the events (its memory target is 1.1×), and the settler's large Arrow
/// and Parquet buffers cost more CPU and memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    meterflow_runtime::service_main("enricher", meterflow_enricher::run)
}
