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
    virus_scanner_producer::runtime(config.worker_threads)?.block_on(async {
        virus_scanner_runtime::init_tracing(config.log_format);
        virus_scanner_producer::run(config, virus_scanner_runtime::shutdown_signal()).await
    })
}
