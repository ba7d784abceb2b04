fn main() -> anyhow::Result<()> {
    meterflow_runtime::service_main("rater", meterflow_rater::run)
}
