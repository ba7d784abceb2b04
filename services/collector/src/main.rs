fn main() -> anyhow::Result<()> {
    meterflow_runtime::service_main("collector", meterflow_collector::run)
}
