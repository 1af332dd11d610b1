//! `trellis`: the node agent and its CLI.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use trellis_agent::config::{AgentConfig, NetworksConfig};
use trellis_agent::handler::Handler;
use trellis_agent::records::RecordStore;
use trellis_agent::source::{files::FileSource, kube::KubeSource, NetworkSource};

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "Multi-network Kubernetes node dataplane agent"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent.
    Agent {
        #[arg(long)]
        config: PathBuf,
        /// Read this tree where /sys would be, overriding sysfs_root (tests).
        #[arg(long)]
        sysfs_root: Option<PathBuf>,
    },
    /// Check a config file and exit.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// The node's network devices and vhost-user sockets, and the pool of each.
    Devices {
        /// Read this tree where /sys would be (fixture trees in tests).
        #[arg(long, default_value = "/sys")]
        sysfs_root: PathBuf,
        /// Resource pool config (sriov-network-device-plugin's config.json format).
        #[arg(long)]
        config: Option<PathBuf>,
        /// resourcePrefix for entries without one.
        #[arg(long, default_value = trellis_device_plugin::config::DEFAULT_PREFIX)]
        resource_prefix: String,
        #[arg(long)]
        json: bool,
    },
    /// Traffic per pod, network and interface, from the dataplane's pins (the agent
    /// need not be running).
    Stats {
        #[arg(long, default_value = "/sys/fs/bpf/trellis")]
        bpffs_dir: PathBuf,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        pod: Option<String>,
        /// A network (`namespace/name`, or the cluster network's name).
        #[arg(long)]
        network: Option<String>,
        #[arg(long)]
        json: bool,
        /// Print again every SECS seconds, with rates.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
        /// The networks' ACL rule hits instead of the interface counters.
        #[arg(long)]
        acl: bool,
    },
    /// List the pods' attachments from the agent's records.
    Attachments {
        #[arg(long, default_value = "/var/lib/trellis")]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Cmd::Agent { config, sysfs_root } => run_agent(&config, sysfs_root),
        Cmd::CheckConfig { config } => {
            AgentConfig::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Cmd::Attachments { state_dir, json } => list_attachments(&state_dir, json),
        Cmd::Stats {
            bpffs_dir,
            network,
            json,
            watch,
            acl: true,
            ..
        } => acl_hits(&bpffs_dir, network, json, watch),
        Cmd::Stats {
            bpffs_dir,
            namespace,
            pod,
            network,
            json,
            watch,
            acl: false,
        } => stats(&bpffs_dir, namespace, pod, network, json, watch),
        Cmd::Devices {
            sysfs_root,
            config,
            resource_prefix,
            json,
        } => list_devices(&sysfs_root, config.as_deref(), &resource_prefix, json),
    }
}

fn stats(
    dir: &std::path::Path,
    namespace: Option<String>,
    pod: Option<String>,
    network: Option<String>,
    json: bool,
    watch: Option<u64>,
) -> anyhow::Result<()> {
    use trellis_agent::dataplane::read_stats;
    let wanted = |s: &trellis_agent::dataplane::SlotStats| {
        namespace.as_ref().is_none_or(|n| &s.owner.namespace == n)
            && pod.as_ref().is_none_or(|p| &s.owner.pod == p)
            && network.as_ref().is_none_or(|n| &s.owner.network == n)
    };
    let read = || -> anyhow::Result<Vec<_>> {
        Ok(read_stats(dir)?.into_iter().filter(|s| wanted(s)).collect())
    };
    let mut prev: Option<(std::time::Instant, Vec<trellis_agent::dataplane::SlotStats>)> = None;
    loop {
        let now = read()?;
        let t = std::time::Instant::now();
        if json {
            println!("{}", serde_json::to_string(&now)?);
        } else {
            println!(
                "{:<12} {:<16} {:<20} {:<8} {:>12} {:>9} {:>7} {:>12} {:>9} {:>7}{}",
                "NAMESPACE",
                "POD",
                "NETWORK",
                "IFACE",
                "RX_BYTES",
                "RX_PKTS",
                "RX_DROP",
                "TX_BYTES",
                "TX_PKTS",
                "TX_DROP",
                if prev.is_some() {
                    "   RX_B/s    TX_B/s"
                } else {
                    ""
                }
            );
            for s in &now {
                // Ingress at the pod's interface is what the pod receives.
                let rate = prev.as_ref().and_then(|(t0, old)| {
                    let o = old
                        .iter()
                        .find(|o| o.slot == s.slot && o.owner == s.owner)?;
                    let dt = t.duration_since(*t0).as_secs_f64().max(1e-3);
                    Some(format!(
                        " {:>9.0} {:>9.0}",
                        (s.ingress.bytes - o.ingress.bytes) as f64 / dt,
                        (s.egress.bytes - o.egress.bytes) as f64 / dt
                    ))
                });
                println!(
                    "{:<12} {:<16} {:<20} {:<8} {:>12} {:>9} {:>7} {:>12} {:>9} {:>7}{}",
                    s.owner.namespace,
                    s.owner.pod,
                    s.owner.network,
                    s.owner.ifname,
                    s.ingress.bytes,
                    s.ingress.packets,
                    s.ingress.drops,
                    s.egress.bytes,
                    s.egress.packets,
                    s.egress.drops,
                    rate.unwrap_or_default()
                );
            }
        }
        let Some(secs) = watch else { return Ok(()) };
        prev = Some((t, now));
        std::thread::sleep(std::time::Duration::from_secs(secs.max(1)));
    }
}

/// `trellis stats --acl`: per network ACL, the hits of every rule that matched
/// something and of the default.
fn acl_hits(
    dir: &std::path::Path,
    network: Option<String>,
    json: bool,
    watch: Option<u64>,
) -> anyhow::Result<()> {
    loop {
        let acls: Vec<_> = trellis_agent::dataplane::read_acl_hits(dir)?
            .into_iter()
            .filter(|a| network.as_ref().is_none_or(|n| &a.network == n))
            .collect();
        if json {
            println!("{}", serde_json::to_string(&acls)?);
        } else {
            println!(
                "{:<28} {:>8} {:<6} {:>14}",
                "NETWORK", "RULE", "ACTION", "PACKETS"
            );
            for a in &acls {
                for (i, (h, act)) in a.rules.iter().zip(&a.actions).enumerate() {
                    if *h > 0 {
                        println!("{:<28} {:>8} {:<6} {:>14}", a.network, i, act, h);
                    }
                }
                println!(
                    "{:<28} {:>8} {:<6} {:>14}",
                    a.network, "default", a.default_action, a.default
                );
            }
        }
        let Some(secs) = watch else { return Ok(()) };
        std::thread::sleep(std::time::Duration::from_secs(secs.max(1)));
    }
}

fn list_devices(
    sysfs_root: &std::path::Path,
    config: Option<&std::path::Path>,
    prefix: &str,
    json: bool,
) -> anyhow::Result<()> {
    use trellis_device_plugin::{config::DeviceConfig, pool::Inventory, report, sysfs::Sysfs};
    let config = config.map(|p| DeviceConfig::load(p, prefix)).transpose()?;
    let inventory = Inventory {
        pci: Sysfs::new(sysfs_root).discover()?,
    };
    let rows = report::rows(&inventory, config.as_ref());
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", report::table(&rows));
    }
    Ok(())
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in log files and journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn run_agent(path: &std::path::Path, sysfs_root: Option<PathBuf>) -> anyhow::Result<()> {
    let mut config = AgentConfig::load(path)?;
    if let Some(root) = sysfs_root {
        config.sysfs_root = root;
    }
    let source: Arc<dyn NetworkSource> = match &config.networks {
        NetworksConfig::Files { dir } => Arc::new(FileSource::new(dir)),
        NetworksConfig::Kubernetes {
            kubeconfig,
            node_name,
        } => {
            let node = match node_name {
                Some(n) => n.clone(),
                None => std::env::var("NODE_NAME")
                    .context("networks.node_name is not set and neither is NODE_NAME")?,
            };
            Arc::new(KubeSource::start(kubeconfig.as_deref(), &node)?)
        }
    };
    // One runtime for the servers; CNI requests run on the socket's worker threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("trellis-rt")
        .enable_all()
        .build()
        .context("starting the agent's runtime")?;
    // Before anything that leaves state behind (the device plugin's sockets): a
    // SIGTERM during start-up stops it cleanly too.
    let stop = {
        let _g = rt.enter();
        stop_signal().context("installing the SIGTERM handler")?
    };
    // One agent per state dir, for the whole life of the process (a stopping agent
    // still finishing calls holds it too): a second one stops here, before it sweeps
    // VF state or reconciles pins the running one is using.
    let _lock = lock_state_dir(&config.state_dir)?;
    // The socket first: a second agent on the node stops here, before it sweeps VF
    // state or reconciles pins the running one is using. (Calls wait in the backlog
    // until the agent serves them.)
    let listener = trellis_agent::server::bind(&config.socket)?;
    // Device pools first: a bad pool config stops the agent before it takes CNI calls.
    let _devices = config
        .devices
        .as_ref()
        .map(|d| {
            let mut s = d.settings(&config.sysfs_root);
            s.in_use_dir = Some(config.state_dir.join("vfs"));
            trellis_device_plugin::manager::start(s)
        })
        .transpose()
        .context("starting the device plugin")?;
    let mut handler = Handler::new(&config, source).context("opening the state dir")?;
    if let Some(d) = &_devices {
        handler = handler.with_device_pools(d.status.clone());
    }
    if config.dataplane.enabled {
        use trellis_agent::dataplane::{Dataplane, DataplaneError};
        match Dataplane::open(&config.dataplane.bpffs_dir) {
            Ok(dp) => handler = handler.with_dataplane(dp),
            // Pins of another version (an upgrade): the pods keep the programs they
            // have; the agent serves CNI without a dataplane (ACL networks are refused)
            // rather than take the node's CNI down.
            Err(e @ DataplaneError::Layout { .. }) => {
                tracing::error!("eBPF dataplane not started: {e}");
                handler = handler.without_dataplane(format!("not started: {e}"));
            }
            Err(e) => return Err(e).context(
                "starting the eBPF dataplane (set [dataplane] enabled = false to run without it)",
            ),
        }
    }
    let handler = Arc::new(handler);
    handler.reconcile_dataplane();
    handler.start_dataplane_worker();
    handler.start_acl_sync(std::time::Duration::from_millis(
        config.dataplane.acl_resync_ms.max(100),
    ));
    if !config.metrics.listen.is_empty() {
        let l = std::net::TcpListener::bind(&config.metrics.listen)
            .with_context(|| format!("metrics.listen {}", config.metrics.listen))?;
        l.set_nonblocking(true)
            .with_context(|| format!("metrics.listen {}", config.metrics.listen))?;
        let h = handler.clone();
        let exposition = Arc::new(trellis_agent::metrics::Exposition::new(
            &handler.metrics,
            config
                .dataplane
                .enabled
                .then(|| config.dataplane.bpffs_dir.clone()),
            Arc::new(move || {
                h.records()
                    .list()
                    .map(|(r, _)| r.iter().map(|r| r.attachments.len()).sum())
                    .unwrap_or(0)
            }),
        ));
        let l = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(l).context("metrics listener")?
        };
        tracing::info!(listen = %config.metrics.listen, "metrics on /metrics");
        rt.spawn(trellis_agent::metrics::serve(l, exposition));
    }
    rt.block_on(trellis_agent::server::serve(listener, handler, stop));
    // The device plugin's sockets go with it: kubelet takes a socket left in its
    // dir for a plugin that died.
    drop(_devices);
    tracing::info!("trellis agent stopped");
    Ok(())
}

/// `state_dir/agent.lock`, held (flock) until the process exits.
fn lock_state_dir(state_dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    // 0700 where trellis creates it; an existing dir keeps the admin's mode.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("state_dir {}", state_dir.display()))?;
    let path = state_dir.join("agent.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            anyhow::anyhow!(
                "{} is held: another trellis agent runs with this state_dir",
                path.display()
            )
        } else {
            anyhow::anyhow!("locking {}: {e}", path.display())
        }
    })
}

/// Completes on SIGTERM (kubelet, systemd) or SIGINT.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{which}: stopping");
        // A second signal does not wait for the drain.
        tokio::spawn(async move {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::warn!("{which} again: exiting now");
            std::process::exit(1);
        });
    })
}

fn list_attachments(state_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let store = RecordStore::open(state_dir)?;
    let (records, corrupt) = store.list()?;
    for e in corrupt {
        eprintln!("warning: {e}");
    }
    if json {
        let v: Vec<_> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "namespace": r.pod_namespace, "pod": r.pod_name, "container": r.container_id,
                    "netns": r.netns, "network-status": r.network_status,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<22} {:<8} {:<18} {:<18}",
        "POD", "NETWORK", "IFACE", "IPS", "MAC"
    );
    for r in &records {
        let pod = format!("{}/{}", r.pod_namespace, r.pod_name);
        for s in r
            .network_status
            .as_ref()
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let ips: Vec<&str> = s["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str())
                .collect();
            println!(
                "{:<28} {:<22} {:<8} {:<18} {:<18}",
                pod,
                s["name"].as_str().unwrap_or(""),
                s["interface"].as_str().unwrap_or(""),
                ips.join(","),
                s["mac"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
