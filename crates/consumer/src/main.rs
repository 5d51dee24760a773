use clap::Parser;
use virus_scanner_consumer::ConsumerArgs;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = match ConsumerArgs::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("virus-scanner-handler: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    virus_scanner_runtime::init_tracing(config.log_format);
    virus_scanner_consumer::run(config, virus_scanner_runtime::shutdown_signal()).await?;
    Ok(())
}
