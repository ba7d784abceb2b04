fn main() -> anyhow::Result<()> {
    meterflow_runtime::service_main("settler", meterflow_settler::run)
}
