fn main() -> anyhow::Result<()> {
    meterflow_runtime::service_main("enricher", meterflow_enricher::run)
}
