use clap::Parser;
use virus_scanner_producer::ProducerArgs;

fn main() -> anyhow::Result<()> {
    let config = match ProducerArgs::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("virus-scanner-producer: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    // Multi-threaded even with one worker: large bodies are handled in `block_in_place`,
    // which hands the other streams to another thread meanwhile.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        virus_scanner_runtime::init_tracing(config.log_format);
        virus_scanner_producer::run(config, virus_scanner_runtime::shutdown_signal()).await
    })
}
