//! Flotilla: an externalgrpc cloud provider for the Kubernetes cluster-autoscaler.
//!
//! cluster-autoscaler (CA) makes every scaling decision and asks Flotilla over gRPC to carry it
//! out; Flotilla turns those calls into machines on clouds CA has no in-tree support for.
//!
//! # Layout
//! * [`config`]: the TOML file, read completely, every problem reported at once.
//! * [`driver`]: the driver trait, the table of driver kinds, one module per cloud, the shared HTTP
//!   layer of the cloud APIs (`driver::http`), the boot-script templates several drivers render
//!   (`driver::script`), and the metrics decorator.
//! * [`state`]: the fleet: machines per group, creates and deletes in flight, reconcile.
//! * [`service`]: the gRPC `CloudProvider` service and the one error-to-status table.
//! * [`template`]: template nodes for scale-from-zero.
//! * [`telemetry`]: Prometheus metrics and the health/readiness endpoint; [`logging`]: the log
//!   set-up, which keeps secrets out of every level.
//! * [`kube`]: the one Kubernetes API client; [`incluster`]: what Flotilla does with it
//!   (leader election, Node cleanup, the priority expander's ConfigMap).
//! * [`provider_id`], [`quantity`]: small formats; [`untrusted`]: caller text made safe to echo.
//! * [`ctl`]: the `flotilla ctl` client, for calling any RPC by hand.
//! * [`import`]: `flotilla import`, from the configurations of the systems users migrate from.
//!
//! [`start`] runs everything on listeners it binds; `main` only parses flags and waits for a
//! signal.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig, server::TcpIncoming};
use tracing::{info, warn};

pub mod config;
pub mod ctl;
pub mod driver;
pub mod import;
pub mod incluster;
pub mod kube;
pub mod logging;
pub mod proto;
pub mod provider_id;
pub mod quantity;
pub mod service;
pub mod state;
pub mod telemetry;
pub mod template;
pub mod untrusted;

use config::Config;
use driver::SharedDriver;
use proto::externalgrpc::cloud_provider_server::CloudProviderServer;
use state::Fleet;
use telemetry::metrics::Metrics;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("gRPC server failed: {0}")]
    Grpc(#[source] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    #[error("{0}")]
    Config(#[from] config::Problems),
    #[error("{feature} needs the kubernetes api: {source}")]
    Kube {
        feature: &'static str,
        #[source]
        source: kube::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub fleet: Arc<Fleet>,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    join: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Running {
    /// Stops accepting requests, waits for in-flight creates and deletes (up to the configured
    /// grace period) and returns how the server ended.
    pub async fn stop(self) -> Result<(), Error> {
        self.shutdown.cancel();
        self.join.await.unwrap_or(Ok(()))
    }

    /// Resolves when the server ends on its own (an error) or is stopped.
    pub async fn wait(&mut self) -> Result<(), Error> {
        (&mut self.join).await.unwrap_or(Ok(()))
    }

    /// A token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Reads a configuration file (or the embedded default) and builds its drivers, listing every
/// problem of the core and of every driver at once.
pub fn load(path: Option<&std::path::Path>) -> Result<(Config, Vec<SharedDriver>), config::Problems> {
    let (config, mut problems) = match path {
        None => (Some(Config::embedded()), config::Problems::default()),
        Some(path) => {
            let source = path.display().to_string();
            let base_dir = path.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
            match std::fs::read_to_string(path) {
                Ok(text) => Config::parse_partial(&text, &source, &base_dir),
                Err(e) => {
                    let mut p = config::Problems::new(source, base_dir);
                    p.push("", format!("cannot read the file: {e}"));
                    (None, p)
                }
            }
        }
    };
    let Some(config) = config else { return Err(problems) };
    let drivers = driver::build(&config, &mut problems);
    if problems.is_empty() { Ok((config, drivers)) } else { Err(problems) }
}

/// Contacts every cloud once (`check-config --probe`): credentials, and whatever each driver
/// can check of its groups there. A cloud that does not answer within a minute is a problem.
pub async fn probe(config: &Config, drivers: &[SharedDriver]) -> config::Problems {
    let mut problems = config::Problems::new(config.source.clone(), config.base_dir.clone());
    for (cloud, driver) in config.clouds.iter().zip(drivers) {
        let path = format!("clouds.{}", cloud.name);
        match tokio::time::timeout(std::time::Duration::from_secs(60), driver.check()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(path, e.to_string()),
            Err(_) => problems.push(path, "no answer within 60s"),
        }
    }
    problems
}

/// Builds the drivers the configuration names.
pub fn build_drivers(config: &Config) -> Result<Vec<SharedDriver>, config::Problems> {
    let mut problems = config::Problems::new(config.source.clone(), config.base_dir.clone());
    let drivers = driver::build(config, &mut problems);
    if problems.is_empty() { Ok(drivers) } else { Err(problems) }
}

/// Binds the configured listeners and serves until [`Running::stop`].
/// `drivers` must hold one driver per configured cloud, in order (see [`build_drivers`]).
pub async fn start(config: Config, drivers: Vec<SharedDriver>) -> Result<Running, Error> {
    // Fail now, not at the first call, when a feature needs the API and there is no way to it.
    let kube_features = [
        ("leader_election", config.leader_election.enabled),
        ("node_cleanup", config.clouds.iter().any(|c| c.node_cleanup)),
        ("priority_expander", config.priority_expander.is_some()),
    ];
    for (feature, on) in kube_features {
        if on {
            config.kube.check_configured().map_err(|source| Error::Kube { feature, source })?;
        }
    }
    let metrics = Arc::new(Metrics::new());
    let drivers = config
        .clouds
        .iter()
        .zip(drivers)
        .map(|(c, d)| driver::metered::Metered::wrap(d, &c.name, Arc::clone(&metrics)))
        .collect();
    let fleet = Fleet::with_metrics(&config, drivers, Arc::clone(&metrics));

    let bind =
        |addr: SocketAddr| async move { TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source }) };
    let grpc_listener = bind(config.server.grpc_listen).await?;
    let grpc_addr =
        grpc_listener.local_addr().map_err(|source| Error::Bind { addr: config.server.grpc_listen, source })?;
    let http_listener = match config.server.http_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.server.tls {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| Error::TlsFile { path: path.to_owned(), source })
        };
        let identity = Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?);
        // tonic's rustls acceptor offers ALPN h2, which grpc-go clients require.
        let tls_config =
            ServerTlsConfig::new().identity(identity).client_ca_root(Certificate::from_pem(read(&tls.client_ca_file)?));
        builder = builder.tls_config(tls_config).map_err(Error::Tls)?;
    }

    let shutdown = CancellationToken::new();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let service = service::Service::new(Arc::clone(&fleet), Arc::clone(&metrics), config.gpu.clone());
    let grpc = builder
        .add_service(health_service)
        .add_service(CloudProviderServer::new(service))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a multi-segment answer (NodeGroupNodes of a large group) waits
            // for the client's delayed ACK: ~40 ms per call on loopback.
            TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        );

    let reconciler = tokio::spawn(Arc::clone(&fleet).run_reconciler(shutdown.clone()));
    let mut in_cluster = tokio::task::JoinSet::new();
    if config.clouds.iter().any(|c| c.node_cleanup) {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        fleet.set_node_cleanup(sender);
        let cleaner = incluster::node_cleanup::NodeCleaner::new(
            config.kube.clone(),
            Arc::clone(&fleet),
            config.state.reconcile_interval,
        );
        in_cluster.spawn(cleaner.run(receiver, shutdown.clone()));
    }
    if let Some(expander) = &config.priority_expander {
        in_cluster.spawn(incluster::priorities::run(
            config.kube.clone(),
            Arc::clone(&fleet),
            expander.namespace.clone(),
            config.cluster_name.clone(),
            config.groups.clone(),
            config.state.reconcile_interval,
            shutdown.clone(),
        ));
    }
    // The elector stops (and releases the Lease) only after the work in flight is done, so no
    // other replica acts while this one still does.
    let election_stop = CancellationToken::new();
    let elector = config.leader_election.enabled.then(|| {
        let election = &config.leader_election;
        let namespace = election.namespace.clone().or_else(|| config.kube.own_namespace()).unwrap_or_else(|| {
            warn!(
                "leader election: no namespace configured, none from the service account or kubeconfig; using default"
            );
            "default".to_owned()
        });
        let identity = election.identity.clone().unwrap_or_else(incluster::leader::default_identity);
        let elector = incluster::leader::Elector::new(
            Arc::new(config.kube.clone()),
            Arc::clone(&fleet),
            election,
            namespace,
            identity,
        );
        tokio::spawn(elector.run(election_stop.clone()))
    });
    let health = tokio::spawn(report_health(Arc::clone(&fleet), health_reporter, shutdown.clone()));
    let http = http_listener.map(|listener| {
        let router = telemetry::http::router(Arc::clone(&fleet), Arc::clone(&metrics));
        let token = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, router).with_graceful_shutdown(token.cancelled_owned()).await.map_err(Error::Http)
        })
    });
    info!(%grpc_addr, http_addr = ?http_addr, tls = config.server.tls.is_some(), groups = fleet.groups.len(), "flotilla serving");

    let grace = config.server.shutdown_grace;
    let join = {
        let fleet = Arc::clone(&fleet);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let result = grpc.await.map_err(Error::Grpc);
            // The gRPC server only returns on shutdown or failure: stop everything else.
            shutdown.cancel();
            let _ = reconciler.await;
            let _ = health.await;
            if let Some(http) = http
                && let Ok(Err(e)) = http.await
            {
                warn!(error = %e, "HTTP server failed");
            }
            while in_cluster.join_next().await.is_some() {}
            let tasks = fleet.tasks();
            tasks.close();
            if !tasks.is_empty() {
                info!(in_flight = tasks.len(), ?grace, "waiting for creates and deletes in flight");
                if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
                    warn!(in_flight = tasks.len(), "shutdown grace period over; abandoning work in flight");
                }
            }
            if let Some(elector) = elector {
                election_stop.cancel();
                let _ = elector.await;
            }
            info!("flotilla stopped");
            result
        })
    };
    Ok(Running { grpc_addr, http_addr, fleet, metrics, shutdown, join })
}

/// Keeps the standard gRPC health service in step with readiness.
async fn report_health(fleet: Arc<Fleet>, reporter: tonic_health::server::HealthReporter, shutdown: CancellationToken) {
    let mut last = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                reporter.set_not_serving::<CloudProviderServer<service::Service>>().await;
                return;
            }
            _ = tick.tick() => {
                let ready = fleet.ready();
                if last != Some(ready) {
                    if ready {
                        reporter.set_serving::<CloudProviderServer<service::Service>>().await;
                        reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
                    } else {
                        reporter.set_not_serving::<CloudProviderServer<service::Service>>().await;
                        reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                    }
                    last = Some(ready);
                }
            }
        }
    }
}
