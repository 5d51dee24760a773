//! The producer (`virus-scanner-producer`): the per-gateway sidecar that Envoy calls over
//! ext_proc. It holds each body, has it scanned through the queue, and lets it through or
//! answers for it.
#![forbid(unsafe_code)]

pub mod body;
pub mod codings;
pub mod config;
mod error;
pub mod ext_proc;
pub mod headers;
pub mod icap;
pub mod metrics;
pub mod scan;
pub mod unpack;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use prometheus_client::registry::Registry;
use virus_scanner_queue::Producer;

pub use config::{ProducerArgs, ProducerConfig};
pub use error::StartError;

/// Room for protobuf framing around the largest body in one ext_proc message.
const GRPC_OVERHEAD: usize = 1 << 20;

/// Runs the producer until `shutdown` resolves.
pub async fn run(
    config: ProducerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    std::fs::create_dir_all(&config.scan_tmp_dir).map_err(StartError::setting(
        "SCAN_TMP_DIR",
        config.scan_tmp_dir.display(),
    ))?;
    // This producer's own directory of the (maybe shared) scan directory.
    let spill_dir =
        body::tenant_spill_dir(&config.scan_tmp_dir, &config.scan.tenant).map_err(|e| {
            StartError::setting("SCAN_TMP_DIR", config.scan_tmp_dir.display())(
                std::io::Error::other(e),
            )
        })?;
    let leftover_age = (config.scan.scan_timeout * 2).max(Duration::from_secs(60));
    match body::remove_leftovers(&spill_dir, leftover_age) {
        Ok(0) => {}
        Ok(n) => tracing::info!(files = n, "removed spilled bodies left by an earlier run"),
        Err(e) => tracing::warn!(error = %e, "cannot clean SCAN_TMP_DIR"),
    }

    let mut registry = Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let producer = connect(&config).await?;
    let limits = body::BodyLimits {
        spill_dir: spill_dir.clone(),
        spill_threshold: config.spill_threshold,
        max: config.max_body,
    };
    let service = Arc::new(scan::ScanService::new(
        config.scan.clone(),
        limits,
        producer,
        metrics,
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let ready: virus_scanner_runtime::ReadinessCheck = {
        let service = service.clone();
        Arc::new(move || {
            let service = service.clone();
            Box::pin(async move {
                service
                    .producer
                    .ping()
                    .await
                    .map_err(|e| format!("redis: {e}"))
            })
        })
    };
    let router = virus_scanner_runtime::ops_router(Arc::new(registry), ready);
    let (http_addr, ops) =
        virus_scanner_runtime::bind_ops(config.http_addr, router, stopped(stop_rx.clone()))
            .await
            .map_err(StartError::setting("HTTP_ADDR", config.http_addr))?;
    let ops = tokio::spawn(ops);

    let max_message = config.max_body as usize + GRPC_OVERHEAD;
    let tcp = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .map_err(StartError::setting("GRPC_ADDR", config.grpc_addr))?;
    let grpc_addr = tcp.local_addr()?;
    let mut listeners = vec![GrpcListener::Tcp(tcp)];
    if let Some(path) = &config.grpc_socket {
        let _ = std::fs::remove_file(path);
        let unix = tokio::net::UnixListener::bind(path)
            .map_err(StartError::setting("GRPC_SOCKET", path.display()))?;
        // Whatever the umask: Envoy runs as another uid of the pod (101, Istio's 1337) and
        // connecting takes write permission on the socket. The directory (the pod's own
        // emptyDir) is what keeps everyone outside the pod away.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
                .map_err(StartError::setting("GRPC_SOCKET", path.display()))?;
        }
        listeners.push(GrpcListener::Unix(unix));
    }
    let mut servers = Vec::new();
    for listener in listeners {
        servers.push(tokio::spawn(serve_ext_proc(
            ext_proc::ExtProcService::new(service.clone()),
            max_message,
            listener,
            stopped(stop_rx.clone()),
        )));
    }
    let icap_addr = match config.icap_addr {
        Some(addr) => {
            let icap_listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(StartError::setting("ICAP_ADDR", addr))?;
            let bound = icap_listener.local_addr()?;
            let icap = Arc::new(icap::IcapServer::new(service.clone(), config.icap.clone()));
            let icap_stop = stopped(stop_rx.clone());
            servers.push(tokio::spawn(async move {
                icap.serve(icap_listener, icap_stop).await;
                Ok(())
            }));
            bound.to_string()
        }
        None => "off".to_owned(),
    };
    tokio::spawn(janitor(spill_dir.clone(), leftover_age, stop_rx.clone()));
    tracing::info!(
        grpc = %grpc_addr,
        grpc_socket = ?config.grpc_socket,
        http = %http_addr,
        icap = %icap_addr,
        spill_dir = %spill_dir.display(),
        "producer started"
    );

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    for s in servers {
        if let Ok(Err(e)) = s.await {
            tracing::warn!(error = %e, "gRPC server");
        }
    }
    let _ = ops.await;
    if let Some(path) = &config.grpc_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// The runtime the producer serves on: multi-threaded even with one worker, since large
/// bodies are handled in `block_in_place`, which hands the other streams to another thread
/// meanwhile.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
}

/// Where the ext_proc server listens.
pub enum GrpcListener {
    Tcp(tokio::net::TcpListener),
    /// For gateways that refuse loopback backends (a socket in a shared emptyDir).
    Unix(tokio::net::UnixListener),
}

/// Serves an ext_proc processor the way the producer serves its own (message limits, no
/// Nagle delay on TCP) until `shutdown` resolves. The benchmark's floor processor is served
/// by this too, so that the two differ only in what they do with a message.
pub async fn serve_ext_proc<P: ExternalProcessor>(
    processor: P,
    max_message: usize,
    listener: GrpcListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let service = ExternalProcessorServer::new(processor)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let server = tonic::transport::Server::builder().add_service(service);
    match listener {
        GrpcListener::Tcp(tcp) => {
            // Each ext_proc answer is a small message Envoy waits for: no Nagle delay.
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(tcp),
                |conn| {
                    if let Ok(c) = &conn {
                        let _ = c.set_nodelay(true);
                    }
                    conn
                },
            );
            server
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        GrpcListener::Unix(unix) => {
            server
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(unix),
                    shutdown,
                )
                .await
        }
    }
}

/// Connects to Redis, retrying while it is unreachable at start-up.
async fn connect(config: &ProducerConfig) -> Result<Producer, StartError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match Producer::connect(config.queue.clone()).await {
            Ok(p) => return Ok(p.with_memo(config.verdict_memo_entries, config.verdict_memo_ttl)),
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "cannot reach redis; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(StartError::Redis(e)),
        }
    }
}

/// Removes spilled files left by killed processes, now and then: this producer's own, in
/// its own directory.
async fn janitor(
    spill_dir: std::path::PathBuf,
    min_age: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = body::remove_leftovers(&spill_dir, min_age) {
            tracing::warn!(error = %e, "cannot clean SCAN_TMP_DIR");
        }
    }
}
