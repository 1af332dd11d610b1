//! `trellis`: the node agent and its CLI.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use trellis_agent::config::{AgentConfig, NetworksConfig};
use trellis_agent::source::{files::FileSource, kube::KubeSource, NetworkSource};
use trellis_agent::verbs::Handler;

use trellis_agent::cli::{self, Filter, Output, DEFAULT_CONFIG};

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
    /// The agent's config. The other commands take bpffs_dir, state_dir, sysfs_root
    /// and the device config from it (flags win); they read the default path when it
    /// exists (in the agent's container) and use built-in defaults when not.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

/// `-o` and the older `--json`.
#[derive(clap::Args)]
struct OutputArgs {
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
    /// Same as `-o json`.
    #[arg(long)]
    json: bool,
}

impl OutputArgs {
    fn get(&self) -> Output {
        if self.json {
            Output::Json
        } else {
            self.output
        }
    }
}

/// `--namespace`, `--pod`, `--network`: the same on every command that lists pods.
#[derive(clap::Args)]
struct FilterArgs {
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    #[arg(long)]
    pod: Option<String>,
    /// A network (`namespace/name`, or the cluster network's name).
    #[arg(long)]
    network: Option<String>,
}

impl From<FilterArgs> for Filter {
    fn from(f: FilterArgs) -> Filter {
        Filter {
            namespace: f.namespace,
            pod: f.pod,
            network: f.network,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent (config: --config, default /etc/trellis/agent.toml).
    Agent {
        /// Read this tree where /sys would be, overriding sysfs_root (tests).
        #[arg(long)]
        sysfs_root: Option<PathBuf>,
    },
    /// Check the config (and the device pool config it names) and exit.
    CheckConfig,
    /// Put trellis on the node (the DaemonSet's init container): copy `trellis-cni`
    /// into the CNI bin dir atomically and write trellis's conflist in front of the
    /// node's default network, waiting for one to exist in auto mode.
    Install {
        /// The host's CNI bin dir, as this process sees it.
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// The shim to copy. Default: `trellis-cni` beside this binary.
        #[arg(long)]
        shim: Option<PathBuf>,
        /// Give up after this many seconds without a primary CNI conf (default: wait).
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        /// The host's CNI conf dir, as this process sees it (default: cni_conf_dir).
        #[arg(long)]
        cni_conf_dir: Option<PathBuf>,
    },
    /// Take trellis off the node: remove its conflist (only if it is trellis's) and
    /// the shim. Pods keep running; their DEL goes to the primary network directly.
    Uninstall {
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// The host's CNI conf dir, as this process sees it (default: cni_conf_dir).
        #[arg(long)]
        cni_conf_dir: Option<PathBuf>,
    },
    /// The node's network devices and vhost-user sockets, and the pool of each.
    Devices {
        /// Read this tree where /sys would be (fixture trees in tests).
        #[arg(long)]
        sysfs_root: Option<PathBuf>,
        /// Resource pool config (sriov-network-device-plugin's config.json format).
        #[arg(long, value_name = "FILE")]
        device_config: Option<PathBuf>,
        /// resourcePrefix for entries without one.
        #[arg(long)]
        resource_prefix: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Traffic per pod, network and interface, from the dataplane's pins (the agent
    /// need not be running).
    Stats {
        #[arg(long)]
        bpffs_dir: Option<PathBuf>,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        out: OutputArgs,
        /// Print again every SECS seconds, with rates.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
        /// The networks' ACL rule hits instead of the interface counters (with
        /// --namespace/--pod: the ACLs of the networks those pods are on; the hits
        /// are each network's, summed over all its pods on the node).
        #[arg(long)]
        acl: bool,
    },
    /// Add a network to a running pod (hot-plug, through the agent's socket; for nodes
    /// without the Kubernetes API source, where a pod's annotation is not followed).
    Attach {
        /// The pod, NAMESPACE/NAME.
        #[arg(long, value_name = "NS/NAME")]
        pod: String,
        /// `[namespace/]nad[@interface]`, or a JSON object of the networks annotation.
        network: String,
        /// The agent's socket.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Remove a network from a running pod: `[namespace/]nad`, `@interface`, or both.
    Detach {
        #[arg(long, value_name = "NS/NAME")]
        pod: String,
        network: String,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Each network's figures on this node as the agent measures them (rates over its
    /// window, utilization, free addresses and devices, cost), through its socket.
    Networks {
        #[arg(long)]
        socket: Option<PathBuf>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List the pods' attachments from the agent's records.
    Attachments {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// `trellis attach` / `detach`: one control request to the agent; prints its answer.
fn control(
    op: &str,
    config: Option<&std::path::Path>,
    socket: Option<PathBuf>,
    pod: String,
    network: String,
) -> anyhow::Result<()> {
    let req = trellis_agent::verbs::control::ControlRequest { pod, network };
    let v = ask_agent(op, config, socket, serde_json::to_value(req)?)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Sends control request `op` with `body` to the agent's socket; its answer.
fn ask_agent(
    op: &str,
    config: Option<&std::path::Path>,
    socket: Option<PathBuf>,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let c = cli::load_config(config)?;
    let socket = socket
        .or_else(|| c.map(|c| c.socket))
        .unwrap_or_else(|| PathBuf::from(trellis_shim::wire::DEFAULT_SOCKET));
    let req = trellis_shim::wire::Request {
        env: [(
            trellis_agent::verbs::control::OP_VAR.to_string(),
            op.to_string(),
        )]
        .into(),
        stdin: body.to_string(),
    };
    // As long as the agent may take: a delegate's timeout, for each step.
    let resp = trellis_shim::wire::call(&socket, &req, std::time::Duration::from_secs(300))
        .with_context(|| format!("asking the agent at {}", socket.display()))?;
    let v: serde_json::Value = serde_json::from_str(&resp.stdout).unwrap_or_default();
    if !resp.ok {
        let mut msg = v["msg"].as_str().unwrap_or(&resp.stdout).to_string();
        if let Some(d) = v["details"].as_str().filter(|d| !d.is_empty()) {
            msg = format!("{msg} ({d})");
        }
        anyhow::bail!("{op}: {msg}");
    }
    Ok(v)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let agent_config = || -> anyhow::Result<(PathBuf, AgentConfig)> {
        let path = cli
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        let c = AgentConfig::load(&path)?;
        Ok((path, c))
    };
    match cli.command {
        Cmd::Agent { sysfs_root } => {
            let (_, c) = agent_config()?;
            // glibc makes a heap per thread that allocates, up to 8 per CPU, and keeps
            // what is freed in each: after a burst of 250 pods the agent held 42 MiB of
            // its own, 20 with one heap. Two serve its few busy threads.
            // SAFETY: mallopt(3) before any thread is started.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
            run_agent(c, sysfs_root)
        }
        Cmd::CheckConfig => {
            let (path, c) = agent_config()?;
            if let Some(d) = &c.devices {
                trellis_device_plugin::config::DeviceConfig::load(&d.config, &d.resource_prefix)
                    .with_context(|| format!("{}: [devices] config", path.display()))?;
            }
            println!("{}: ok", path.display());
            Ok(())
        }
        Cmd::Install {
            cni_bin_dir,
            shim,
            wait,
            cni_conf_dir,
        } => {
            let (_, mut c) = agent_config()?;
            if let Some(d) = cni_conf_dir {
                c.cni_conf_dir = d;
            }
            let shim = match shim {
                Some(s) => s,
                None => std::env::current_exe()
                    .context("finding this binary")?
                    .with_file_name("trellis-cni"),
            };
            trellis_agent::node_conf::install(
                &c,
                &shim,
                &cni_bin_dir,
                wait.map(std::time::Duration::from_secs),
            )?;
            Ok(())
        }
        Cmd::Uninstall {
            cni_bin_dir,
            cni_conf_dir,
        } => {
            let (_, mut c) = agent_config()?;
            if let Some(d) = cni_conf_dir {
                c.cni_conf_dir = d;
            }
            for p in trellis_agent::node_conf::uninstall(&c, &cni_bin_dir)? {
                println!("removed {}", p.display());
            }
            Ok(())
        }
        Cmd::Attach {
            pod,
            network,
            socket,
        } => control("attach", cli.config.as_deref(), socket, pod, network),
        Cmd::Detach {
            pod,
            network,
            socket,
        } => control("detach", cli.config.as_deref(), socket, pod, network),
        Cmd::Networks { socket, out } => {
            let v = ask_agent(
                "networks",
                cli.config.as_deref(),
                socket,
                serde_json::json!({}),
            )?;
            let kpis: Vec<trellis_agent::choice::kpi::NetworkKpi> =
                serde_json::from_value(v).context("the agent's answer")?;
            print!("{}", cli::networks_table(&kpis, out.get())?);
            Ok(())
        }
        Cmd::Attachments {
            state_dir,
            filter,
            out,
        } => {
            let c = cli::load_config(cli.config.as_deref())?;
            let dir = state_dir
                .or_else(|| c.map(|c| c.state_dir))
                .unwrap_or_else(|| PathBuf::from("/var/lib/trellis"));
            print!("{}", cli::attachments(&dir, &filter.into(), out.get())?);
            Ok(())
        }
        Cmd::Stats {
            bpffs_dir,
            filter,
            out,
            watch,
            acl,
        } => {
            let c = cli::load_config(cli.config.as_deref())?;
            let dir = bpffs_dir
                .or_else(|| c.map(|c| c.dataplane.bpffs_dir))
                .unwrap_or_else(trellis_agent::config::default_bpffs_dir);
            stats(&dir, filter.into(), out.get(), watch, acl)
        }
        Cmd::Devices {
            sysfs_root,
            device_config,
            resource_prefix,
            out,
        } => {
            let c = cli::load_config(cli.config.as_deref())?;
            let sysfs_root = sysfs_root
                .or_else(|| c.as_ref().map(|c| c.sysfs_root.clone()))
                .unwrap_or_else(|| PathBuf::from("/sys"));
            let devices = c.and_then(|c| c.devices);
            let device_config =
                device_config.or_else(|| devices.as_ref().map(|d| d.config.clone()));
            let prefix = resource_prefix
                .or_else(|| devices.map(|d| d.resource_prefix))
                .unwrap_or_else(|| trellis_device_plugin::config::DEFAULT_PREFIX.into());
            print!(
                "{}",
                cli::devices(&sysfs_root, device_config.as_ref(), &prefix, out.get())?
            );
            Ok(())
        }
    }
}

/// `trellis stats [--acl] [--watch SECS]`.
fn stats(
    dir: &std::path::Path,
    filter: Filter,
    output: Output,
    watch: Option<u64>,
    acl: bool,
) -> anyhow::Result<()> {
    let mut prev: Option<(std::time::Instant, Vec<trellis_agent::dataplane::SlotStats>)> = None;
    loop {
        if acl {
            print!("{}", cli::acl_table(dir, &filter, output)?);
        } else {
            let now = cli::read_filtered_stats(dir, &filter)?;
            let t = std::time::Instant::now();
            let p = prev.as_ref().map(|(t0, old)| {
                (
                    old.as_slice(),
                    t.duration_since(*t0).as_secs_f64().max(1e-3),
                )
            });
            print!("{}", cli::stats_table(&now, p, output)?);
            prev = Some((t, now));
        }
        let Some(secs) = watch else { return Ok(()) };
        std::thread::sleep(std::time::Duration::from_secs(secs.max(1)));
        if output != Output::Json {
            println!();
        }
    }
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

fn run_agent(mut config: AgentConfig, sysfs_root: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(root) = sysfs_root {
        config.sysfs_root = root;
    }
    if let Some(h) = &config.host_process {
        // In a container: pods' netns paths are the host's.
        trellis_agent::netns::set_host_root(h.join("root"));
        use std::os::unix::fs::MetadataExt;
        let ns = |p: PathBuf| std::fs::metadata(&p).map(|m| (m.dev(), m.ino())).ok();
        let (theirs, ours) = (ns(h.join("ns/mnt")), ns("/proc/self/ns/mnt".into()));
        if theirs.is_none() {
            anyhow::bail!(
                "host_process {}: cannot read its ns/mnt (is the container in the host's PID namespace, hostPID: true?)",
                h.display()
            );
        }
        if theirs == ours {
            tracing::warn!(host = %h.display(),
                "host_process is in this process's own mount namespace: delegates see this container's files, not the host's");
        }
        tracing::info!(host = %h.display(), "delegates run in that process's mount namespace");
    }
    let source: Arc<dyn NetworkSource> = match &config.networks {
        NetworksConfig::Files { dir } => Arc::new(FileSource::new(dir)),
        NetworksConfig::Kubernetes {
            kubeconfig,
            node_name,
            ..
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
            s.vf_claims = Some(trellis_devices::VfClaims::under(&config.state_dir));
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
            Ok(mut dp) => {
                dp.set_ingress_limit(config.dataplane.ingress_limit);
                dp.set_acl_share(config.dataplane.acl_share_per_namespace);
                handler = handler.with_dataplane(dp)
            }
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
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if config.default_network == trellis_agent::config::DefaultNetwork::Auto {
        // trellis's conflist follows the primary conf (written first by `trellis install`).
        trellis_agent::node_conf::follow(config.clone(), stopping.clone());
    }
    handler.reconcile_dataplane();
    handler.attach_unattached();
    handler.start_acl_sync(std::time::Duration::from_millis(
        config.dataplane.acl_resync_ms.max(100),
    ));
    // Pods that vanished without DEL, and VF state no record holds.
    handler
        .engine()
        .start_stale_sweep(std::time::Duration::from_secs(config.stale_sweep_secs));
    // Running pods' annotation edits (Kubernetes source), and the rates networks are
    // chosen by.
    trellis_agent::dynamic::start(
        handler.engine().clone(),
        std::time::Duration::from_millis(config.dynamic.kpi_sample_ms.max(200)),
        std::time::Duration::from_secs(config.dynamic.move_grace_secs),
    );
    if config.dataplane.enabled && handler.engine().dataplane_running() {
        trellis_agent::choice::kpi::start_sampling(
            handler.engine().kpi.clone(),
            config.dataplane.bpffs_dir.clone(),
            std::time::Duration::from_millis(config.dynamic.kpi_sample_ms.max(100)),
        );
    }
    if !config.metrics.listen.is_empty() {
        let l = std::net::TcpListener::bind(&config.metrics.listen)
            .with_context(|| format!("metrics.listen {}", config.metrics.listen))?;
        l.set_nonblocking(true)
            .with_context(|| format!("metrics.listen {}", config.metrics.listen))?;
        let h = handler.clone();
        let (live, ready, kpis) = (handler.clone(), handler.clone(), handler.clone());
        let exposition = Arc::new(
            trellis_agent::metrics::Exposition::new(
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
            )
            .with_probes(
                Arc::new(move || live.liveness()),
                Arc::new(move || ready.readiness()),
            )
            .with_networks(Arc::new(move || {
                let e = kpis.engine();
                e.known_networks()
                    .and_then(|n| e.network_kpis(&n))
                    .unwrap_or_default()
            })),
        );
        let l = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(l).context("metrics listener")?
        };
        tracing::info!(listen = %config.metrics.listen, "serving /metrics, /healthz, /readyz");
        rt.spawn(trellis_agent::metrics::serve(l, exposition));
    } else {
        tracing::warn!(
            "[metrics] listen is empty: no /metrics, and no /healthz or /readyz for probes"
        );
    }
    let stop = async move {
        stop.await;
        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    };
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
