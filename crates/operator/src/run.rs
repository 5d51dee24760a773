//! `virus-scan-operator run`: the wiring of one replica (ops endpoint, webhook, certificate
//! upkeep) and the leader loop that runs the controller only while this replica holds the
//! lease.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::cli::RunArgs;
use crate::error::Error;
use crate::{certs, controller, inject, lease, metrics, tenants, webhook};

/// Runs the operator until SIGTERM: the ops endpoint on every replica, the controller only
/// on the leader. Losing the lease ends the process (the kubelet restarts it as a
/// candidate), which is the one way to be sure no write of the old term is in flight.
pub async fn run(args: RunArgs) -> Result<(), Error> {
    args.validate()?;
    let tenant_users = args.tenant_users()?;
    let client = kube::Client::try_default()
        .await
        .map_err(Error::ClientConfig)?;
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

    let webhook_metrics = webhook::WebhookMetrics::register(&mut registry);

    // The injector runs on every replica.
    let resolver = Arc::new(certs::CertResolver::default());
    tokio::spawn(certs::maintain(
        client.clone(),
        args.cert_source(),
        resolver.clone(),
        Duration::from_secs(args.webhook_cert_check_seconds),
    ));
    let (policies, cache) = webhook::policy_cache(client.clone());
    tokio::spawn(cache);
    // The webhook injects with these and the controller checks injected pods against them.
    let defaults = Arc::new(inject::InjectDefaults {
        image: args.producer_image.clone(),
        redis: args.default_redis(),
    });
    let injector = webhook::Injector {
        policies,
        defaults: defaults.clone(),
        metrics: webhook_metrics,
        envoy_gateway_namespace: Some(args.envoy_gateway_namespace.clone())
            .filter(|n| !n.is_empty()),
    };
    let webhook_listener = tokio::net::TcpListener::bind(args.webhook_addr)
        .await
        .map_err(|error| Error::Bind {
            setting: "WEBHOOK_ADDR",
            addr: args.webhook_addr,
            error,
        })?;
    let webhook_addr = webhook_listener.local_addr().map_err(|error| Error::Bind {
        setting: "WEBHOOK_ADDR",
        addr: args.webhook_addr,
        error,
    })?;
    tracing::info!(addr = %webhook_addr, "webhook listening");
    tokio::spawn({
        let resolver = resolver.clone();
        let app = webhook::router(injector.clone());
        let stop = stopped();
        async move {
            if let Err(e) = webhook::serve_tls(webhook_listener, resolver, app, stop).await {
                tracing::error!(error = %e, "webhook TLS configuration failed");
            }
        }
    });

    // Ready once the webhook has a certificate to present and the policies to decide by;
    // until then the Service sends the API server no admission review to this replica.
    let ready: virus_scanner_runtime::ReadinessCheck = Arc::new(move || {
        let loaded = resolver.is_loaded();
        let synced = injector.policies_synced();
        Box::pin(async move {
            match (loaded, synced) {
                (true, true) => Ok(()),
                (false, _) => Err("no webhook certificate yet".to_owned()),
                (true, false) => Err("the VirusScanPolicy cache has not synced".to_owned()),
            }
        })
    });
    let router = virus_scanner_runtime::ops_router(Arc::new(registry), ready);
    let (addr, serve) = virus_scanner_runtime::bind_ops(args.metrics_addr, router, stopped())
        .await
        .map_err(|error| Error::Bind {
            setting: "METRICS_ADDR",
            addr: args.metrics_addr,
            error,
        })?;
    tracing::info!(%addr, identity, "operator started");
    let ops = tokio::spawn(serve);

    let elector = lease::LeaderElector::new(
        client.clone(),
        &args.namespace,
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_duration_seconds),
    );
    let ctx = Arc::new(
        controller::Context::new(client, &identity, metrics.clone(), defaults)
            .with_envoy_gateway_namespace(
                Some(args.envoy_gateway_namespace.clone()).filter(|n| !n.is_empty()),
            )
            .with_istio_root_namespace(
                Some(args.istio_root_namespace.clone()).filter(|n| !n.is_empty()),
            ),
    );
    let outcome = lead(&elector, ctx, tenant_users, stopped).await;
    metrics.leader.set(0);
    elector.release().await;
    ops.abort();
    outcome
}

async fn lead<F, Fut>(
    elector: &lease::LeaderElector,
    ctx: Arc<controller::Context>,
    tenant_users: Option<tenants::TenantUsers>,
    stopped: F,
) -> Result<(), Error>
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
    ctx.metrics.leader.set(1);

    let (lost_tx, lost_rx) = watch::channel(false);
    // The leader alone keeps the tenants' Redis users, until it stops or loses the lease.
    if let Some(settings) = tenant_users {
        let mut lost = lost_rx.clone();
        let stop = stopped();
        tokio::spawn(tenants::run(ctx.client.clone(), settings, async move {
            tokio::select! {
                () = stop => {}
                _ = lost.wait_for(|l| *l) => {}
            }
        }));
    }
    let controller_stop = {
        let mut lost = lost_rx;
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
                return Err(Error::LeaseLost);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the leader lease");
                if last_renewal.elapsed() >= deadline {
                    let _ = lost_tx.send(true);
                    let _ = controller.await;
                    return Err(Error::LeaseNotRenewed(deadline));
                }
            }
        }
    }
    let _ = controller.await;
    Ok(())
}
