use virus_scanner_consumer::ConsumerArgs;
use virus_scanner_runtime::env::{self, ProcessEnv};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: ConsumerArgs = env::parse(&ProcessEnv);
    let config = match args.validate() {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("virus-scanner-handler: invalid configuration:");
            for message in errors.messages() {
                eprintln!("  {message}");
            }
            std::process::exit(2);
        }
    };
    virus_scanner_runtime::init_tracing(config.log_format);
    virus_scanner_consumer::run(config, virus_scanner_runtime::shutdown_signal()).await?;
    Ok(())
}
