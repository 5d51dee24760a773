//! `virus-scan-operator`: the VirusScanPolicy CRD, the controller that turns policies into
//! Envoy configuration, and the tools to render both offline.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod controller;
pub mod crd;
pub mod envoy;
pub mod error;
pub mod lease;
pub mod metrics;
pub mod selector;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use virus_scanner_runtime::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "virus-scan-operator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (the default).
    Run,
    /// Print the VirusScanPolicy CustomResourceDefinition.
    Crd,
    /// Render the Envoy configuration of a policy file, without a cluster.
    EnvoyConfig(EnvoyConfigArgs),
}

#[derive(Debug, Args)]
pub struct EnvoyConfigArgs {
    /// A VirusScanPolicy (YAML or JSON); `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Merge into this Envoy bootstrap and print the derived bootstrap.
    #[arg(long)]
    pub bootstrap: Option<PathBuf>,
    /// Print one piece only: filter, cluster, routes or bootstrap (the example).
    #[arg(long)]
    pub piece: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address of /health, /ready and /metrics.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Namespace of the leader lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "virus-scanner")]
    pub namespace: String,
    /// This replica's name in the lease; defaults to the host name and process id.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, env = "LEASE_NAME", default_value = "virus-scan-operator")]
    pub lease_name: String,
    /// How long a leader's lease lasts without renewal; it renews every third of it.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// json or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
}

impl RunArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (3..=3600).contains(&self.lease_duration_seconds),
            "LEASE_DURATION_SECONDS must be between 3 and 3600, got {}",
            self.lease_duration_seconds
        );
        Ok(())
    }

    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "operator".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Runs the operator until SIGTERM: the ops endpoint on every replica, the controller only
/// on the leader. Losing the lease ends the process (the kubelet restarts it as a
/// candidate), which is the one way to be sure no write of the old term is in flight.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    args.validate()?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let identity = args.identity();
    let mut registry = Registry::with_prefix("virus_scan_operator");
    let metrics = metrics::Metrics::register(&mut registry);

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };
    tokio::spawn(async move {
        virus_scanner_runtime::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let ready: virus_scanner_runtime::ReadinessCheck = Arc::new(|| Box::pin(async { Ok(()) }));
    let router = virus_scanner_runtime::ops_router(Arc::new(registry), ready);
    let (addr, serve) = virus_scanner_runtime::bind_ops(args.metrics_addr, router, stopped())
        .await
        .with_context(|| format!("cannot bind METRICS_ADDR {}", args.metrics_addr))?;
    tracing::info!(%addr, identity, "operator started");
    let ops = tokio::spawn(serve);

    let elector = lease::LeaderElector::new(
        client.clone(),
        &args.namespace,
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_duration_seconds),
    );
    let outcome = lead(&elector, client, metrics.clone(), &identity, stopped).await;
    metrics.leader.set(0);
    elector.release().await;
    ops.abort();
    outcome
}

async fn lead<F, Fut>(
    elector: &lease::LeaderElector,
    client: kube::Client,
    metrics: metrics::Metrics,
    identity: &str,
    stopped: F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let shutdown = stopped();
    tokio::pin!(shutdown);
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the leader lease"),
        }
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(elector.retry_period()) => {}
        }
    }
    tracing::info!(identity = elector.identity(), "leading");
    metrics.leader.set(1);

    let ctx = Arc::new(controller::Context::new(client, identity, metrics));
    let (lost_tx, mut lost_rx) = watch::channel(false);
    let controller_stop = {
        let mut lost = lost_rx.clone();
        let stop = stopped();
        async move {
            tokio::select! {
                () = stop => {}
                _ = lost.wait_for(|l| *l) => {}
            }
        }
    };
    let controller = tokio::spawn(controller::run(ctx, controller_stop));
    let mut last_renewal = tokio::time::Instant::now();
    let deadline = elector.retry_period() * 3;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(elector.retry_period()) => {}
        }
        match elector.try_acquire_or_renew().await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => {
                let _ = lost_tx.send(true);
                let _ = controller.await;
                anyhow::bail!("lost the leader lease to another replica");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the leader lease");
                if last_renewal.elapsed() >= deadline {
                    let _ = lost_tx.send(true);
                    let _ = controller.await;
                    anyhow::bail!("could not renew the leader lease for {deadline:?}");
                }
            }
        }
    }
    let _ = lost_rx.borrow_and_update();
    let _ = controller.await;
    Ok(())
}

/// `virus-scan-operator envoy-config`: what the controller would write, on standard output.
pub fn envoy_config(args: &EnvoyConfigArgs) -> anyhow::Result<String> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the policy from stdin")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let policy: crd::VirusScanPolicy = serde_saphyr::from_str(&text)
        .with_context(|| format!("{} is not a VirusScanPolicy", args.file.display()))?;
    let spec = &policy.spec;
    if let Some(path) = &args.bootstrap {
        let tenant =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let (merged, report) = bootstrap::merge(&tenant, spec)
            .with_context(|| format!("merging into {}", path.display()))?;
        for route in &report.unmatched_opt_outs {
            eprintln!("warning: opted-out route {route:?} matches no route of the bootstrap");
        }
        return Ok(envoy::to_yaml(&merged));
    }
    let piece = |name: &str| match name {
        "filter" => Ok(envoy::to_yaml(&envoy::ext_proc_filter(spec))),
        "cluster" => Ok(envoy::to_yaml(&envoy::producer_cluster(spec))),
        "routes" => Ok(envoy::to_yaml(&serde_json::json!(envoy::route_overrides(
            spec
        )))),
        "bootstrap" => Ok(envoy::to_yaml(&envoy::example_bootstrap(spec))),
        other => Err(anyhow::anyhow!(
            "--piece must be filter, cluster, routes or bootstrap, got {other:?}"
        )),
    };
    match &args.piece {
        Some(p) => piece(p),
        None => {
            let mut out = String::new();
            for (name, title) in [
                (
                    "filter",
                    "the http filter, before envoy.filters.http.router",
                ),
                ("cluster", "the producer cluster"),
                ("routes", "typed_per_filter_config for each opted-out route"),
                ("bootstrap", "a complete example bootstrap"),
            ] {
                out.push_str(&format!("---\n# {title}\n{}", piece(name)?));
            }
            Ok(out)
        }
    }
}
