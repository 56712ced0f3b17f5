//! The `flotilla` binary: flags, logging, signals. Everything else is in the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "An externalgrpc cloud provider for the Kubernetes cluster-autoscaler")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the externalgrpc protocol (and health/metrics over HTTP).
    Serve {
        /// Configuration file; without it, the embedded simulated cloud.
        #[arg(long, short, env = "FLOTILLA_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and list every problem in it.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
        /// Also contact every cloud: credentials, and whether each group can work there
        /// (e.g. a Proxmox template whose clones cannot reach any allowed node).
        #[arg(long)]
        probe: bool,
    },
    /// Print cluster-autoscaler's priority-expander ConfigMap for the groups' `priority`
    /// (what `[priority_expander]` applies), e.g. to commit it to a GitOps repository.
    PriorityConfigmap {
        #[arg(long, short)]
        config: PathBuf,
        /// cluster-autoscaler's namespace (default: `[priority_expander] namespace`, else kube-system).
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Turn a Kamatera, Slicer, OpenStack, Proxmox or Docker autoscaler's configuration into a
    /// Flotilla configuration, the cluster-autoscaler flags to use, and the Helm values for
    /// charts/flotilla.
    Import(flotilla::import::Args),
    /// Call one RPC of a running server by hand.
    Ctl {
        #[command(flatten)]
        target: flotilla::ctl::Target,
        #[command(subcommand)]
        command: flotilla::ctl::Command,
    },
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let (config, drivers) = match flotilla::load(config.as_deref()) {
                Ok(x) => x,
                Err(problems) => {
                    eprint!("{problems}");
                    return ExitCode::FAILURE;
                }
            };
            flotilla::logging::init(config.log.format, &config.log.level);
            tracing::info!(source = %config.source, cluster = %config.cluster_name, "configuration loaded");
            let mut running = match flotilla::start(config, drivers).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start");
                    return ExitCode::FAILURE;
                }
            };
            let result = tokio::select! {
                _ = shutdown_signal() => {
                    tracing::info!("signal received, shutting down");
                    running.stop().await
                }
                r = running.wait() => r,
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "server failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config, probe } => match flotilla::load(Some(&config)) {
            Ok((c, drivers)) => {
                if probe {
                    let problems = flotilla::probe(&c, &drivers).await;
                    if !problems.is_empty() {
                        eprint!("{problems}");
                        return ExitCode::FAILURE;
                    }
                }
                println!("{}: ok ({} clouds, {} node groups)", c.source, c.clouds.len(), c.groups.len());
                ExitCode::SUCCESS
            }
            Err(problems) => {
                eprint!("{problems}");
                ExitCode::FAILURE
            }
        },
        Command::PriorityConfigmap { config, namespace } => match flotilla::load(Some(&config)) {
            Ok((c, _)) => {
                let namespace = namespace
                    .or_else(|| c.priority_expander.as_ref().map(|p| p.namespace.clone()))
                    .unwrap_or_else(|| "kube-system".to_owned());
                print!("{}", flotilla::incluster::priorities::config_map_yaml(&c, &namespace));
                ExitCode::SUCCESS
            }
            Err(problems) => {
                eprint!("{problems}");
                ExitCode::FAILURE
            }
        },
        Command::Import(args) => match flotilla::import::run(args) {
            true => ExitCode::SUCCESS,
            false => ExitCode::FAILURE,
        },
        Command::Ctl { target, command } => match flotilla::ctl::run(&target, command).await {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                match e.downcast_ref::<tonic::Status>() {
                    Some(s) => eprintln!("error: {:?}: {}", s.code(), s.message()),
                    None => eprintln!("error: {e}"),
                }
                ExitCode::FAILURE
            }
        },
    }
}
