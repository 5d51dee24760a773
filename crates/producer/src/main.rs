use virus_scanner_producer::ProducerArgs;
use virus_scanner_runtime::env::{self, ProcessEnv};

/// Bodies come and go in bursts; glibc's allocator keeps the pages a burst freed (arenas
/// fragmented by the many small frames of gRPC, HTTP and Redis), so a sidecar would stay
/// near its peak for good. jemalloc, with its background thread, purges freed pages after a
/// few seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    // `virus-scanner-producer probe PORT PATH`: the injected sidecar's exec probes.
    if let Some(code) = virus_scanner_runtime::probe::probe_command(std::env::args()) {
        std::process::exit(code);
    }
    let args: ProducerArgs = env::parse(&ProcessEnv);
    let config = match args.validate() {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("virus-scanner-producer: invalid configuration:");
            for message in errors.messages() {
                eprintln!("  {message}");
            }
            std::process::exit(2);
        }
    };
    virus_scanner_producer::runtime(config.worker_threads)?.block_on(async {
        virus_scanner_runtime::init_tracing(config.log_format);
        virus_scanner_producer::run(config, virus_scanner_runtime::shutdown_signal())
            .await
            .map_err(anyhow::Error::from)
    })
}
