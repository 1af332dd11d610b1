//! Runs the pools: one gRPC server per pool on a socket in kubelet's device-plugins
//! dir, registered with kubelet; devices re-discovered every `poll_interval` (health
//! and VFs coming and going reach ListAndWatch within that), the config reloaded
//! when its file changes, and everything re-registered as soon as kubelet re-creates
//! its socket (inotify, no polling).

use crate::api::deviceplugin as dp;
use crate::config::{ConfigError, DeviceConfig, ResourceConfig, ResourceKind};
use crate::pool::{self, Inventory, PoolDevice};
use crate::server::{self, PoolService, PoolState};
use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use trellis_devices::sysfs::{DiscoveryError, Sysfs};

pub const KUBELET_SOCKET: &str = "kubelet.sock";
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";

#[derive(Debug, Clone)]
pub struct Settings {
    /// The pool config (sriov-network-device-plugin's config.json format).
    pub config: PathBuf,
    pub sysfs_root: PathBuf,
    /// resourcePrefix for entries without one.
    pub resource_prefix: String,
    /// kubelet's device-plugins dir: its `kubelet.sock` and our sockets.
    pub plugin_dir: PathBuf,
    pub poll_interval: Duration,
    /// The VFs the agent has moved into pods: their netdevs are not in the host's
    /// view, which is no reason to call them unhealthy.
    pub vf_claims: Option<trellis_devices::VfClaims>,
}

impl Settings {
    pub fn new(config: impl Into<PathBuf>) -> Settings {
        Settings {
            config: config.into(),
            sysfs_root: "/sys".into(),
            resource_prefix: crate::config::DEFAULT_PREFIX.into(),
            plugin_dir: DEFAULT_PLUGIN_DIR.into(),
            poll_interval: Duration::from_millis(500),
            vf_claims: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ManagerError {
    let what = what.into();
    move |source| ManagerError::Io { what, source }
}

/// What the manager has done, for the CLI, metrics and tests.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Per pool (`prefix/name`): successful registrations with kubelet.
    pub registrations: BTreeMap<String, u64>,
    /// Per pool: the devices served now.
    pub devices: BTreeMap<String, Vec<PoolDevice>>,
    pub last_error: Option<String>,
}

impl Status {
    /// The pool (`prefix/name`) that serves device `id` (a PCI address or a socket
    /// path, compared whole), if any.
    pub fn pool_of(&self, id: &str) -> Option<&str> {
        self.devices
            .iter()
            .find(|(_, devs)| devs.iter().any(|d| d.id == id))
            .map(|(pool, _)| pool.as_str())
    }
}

/// The running manager; stops (servers down, sockets removed) when dropped.
pub struct ManagerHandle {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Told when the manager's thread has shut down (its sockets removed).
    stopped: std::sync::mpsc::Receiver<()>,
    /// Where our sockets are, to remove them if the thread does not stop in time.
    plugin_dir: PathBuf,
    pub status: Arc<Mutex<Status>>,
}

impl ManagerHandle {
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the pools, waiting at most `STOP_TIMEOUT` (a registration with a kubelet
    /// that does not answer can take seconds): then the sockets are removed from here.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let Some(t) = self.thread.take() else { return };
        match self.stopped.recv_timeout(STOP_TIMEOUT) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = t.join();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "device plugin did not stop within {STOP_TIMEOUT:?}; removing its sockets"
                );
                for e in std::fs::read_dir(&self.plugin_dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with("trellis-") && n.ends_with(".sock") {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }
}

impl Drop for ManagerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Running {
    state: watch::Sender<Arc<PoolState>>,
    socket: PathBuf,
    server: Option<tokio::task::JoinHandle<()>>,
    /// Registered with the kubelet there now. A restarted kubelet (known by the
    /// inotify events on `kubelet.sock`) needs every plugin to register again.
    registered: bool,
    /// vhost-user sockets seen before: a switch that goes away leaves its devices
    /// listed as unhealthy rather than gone.
    vhost_seen: BTreeMap<String, PoolDevice>,
}

/// What one registration round did.
#[derive(Debug, Default, Clone, Copy)]
struct Registered {
    ok: usize,
    failed: usize,
}

struct Manager {
    settings: Settings,
    config: DeviceConfig,
    pools: BTreeMap<String, Running>,
    status: Arc<Mutex<Status>>,
    /// kubelet.sock went away and its CREATE event has not been read yet: a socket
    /// there now belongs to the next kubelet, registered with once that event comes
    /// (so one restart is one registration per pool).
    awaiting_kubelet: bool,
}

/// `trellis-<prefix>-<name>.sock`: one socket per pool.
fn socket_name(r: &ResourceConfig) -> String {
    format!("trellis-{}-{}.sock", r.prefix, r.name)
}

fn discover(settings: &Settings, config: &DeviceConfig) -> Result<Inventory, DiscoveryError> {
    let wants_pci = config
        .resources
        .iter()
        .any(|r| matches!(r.kind, ResourceKind::NetDevice(_)));
    Ok(Inventory {
        pci: if wants_pci {
            Sysfs::new(&settings.sysfs_root).discover()?
        } else {
            Vec::new()
        },
    })
}

impl Manager {
    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn start_server(
        &self,
        socket: &Path,
        rx: watch::Receiver<Arc<PoolState>>,
    ) -> Result<tokio::task::JoinHandle<()>, ManagerError> {
        let incoming = crate::uds::bind(socket)
            .map_err(io_err(format!("cannot listen on {}", socket.display())))?;
        let svc = dp::device_plugin_server::DevicePluginServer::new(PoolService::new(rx));
        let name = socket.display().to_string();
        Ok(tokio::spawn(async move {
            // Connections are tasks, not threads; ListAndWatch streams for as long as
            // kubelet lives, so no request deadline, but a dead peer is found by
            // keepalive and one connection cannot open streams without end.
            if let Err(e) = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .max_concurrent_streams(Some(64))
                .concurrency_limit_per_connection(64)
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::warn!(socket = %name, "device plugin server: {e}");
            }
        }))
    }

    /// Makes the running pools match `pools`: new ones started, gone ones stopped,
    /// the rest given their new devices.
    fn apply(&mut self, pools: Vec<pool::Pool>) {
        let wanted: Vec<String> = pools.iter().map(|p| p.resource.full_name()).collect();
        let gone: Vec<String> = self
            .pools
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(mut r) = self.pools.remove(&k) {
                if let Some(s) = r.server.take() {
                    s.abort();
                }
                let _ = std::fs::remove_file(&r.socket);
                tracing::info!(pool = %k, "pool removed");
            }
        }
        for p in pools {
            let key = p.resource.full_name();
            match self.pools.get_mut(&key) {
                Some(r) => {
                    let mut devices = p.devices;
                    if matches!(p.resource.kind, ResourceKind::VhostUser { .. }) {
                        devices = keep_vanished(&mut r.vhost_seen, devices);
                    }
                    let state = PoolState {
                        resource: p.resource,
                        devices,
                    };
                    r.state.send_if_modified(|cur| {
                        let changed = cur.resource != state.resource || cur.devices != state.devices;
                        if changed {
                            tracing::info!(pool = %key, devices = state.devices.len(),
                                healthy = state.devices.iter().filter(|d| d.health.is_ok()).count(), "devices changed");
                            *cur = Arc::new(state);
                        }
                        changed
                    });
                }
                None => {
                    let socket = self.settings.plugin_dir.join(socket_name(&p.resource));
                    let mut vhost_seen = BTreeMap::new();
                    let devices = keep_vanished(&mut vhost_seen, p.devices);
                    let (tx, rx) = watch::channel(Arc::new(PoolState {
                        resource: p.resource,
                        devices,
                    }));
                    let server = match self.start_server(&socket, rx) {
                        Ok(s) => Some(s),
                        Err(e) => {
                            tracing::error!(pool = %key, "{e}");
                            self.set_status(|s| s.last_error = Some(e.to_string()));
                            None
                        }
                    };
                    tracing::info!(pool = %key, socket = %socket.display(), "pool started");
                    self.pools.insert(
                        key,
                        Running {
                            state: tx,
                            socket,
                            server,
                            registered: false,
                            vhost_seen,
                        },
                    );
                }
            }
        }
        let devices = self
            .pools
            .iter()
            .map(|(k, r)| (k.clone(), r.state.borrow().devices.clone()))
            .collect();
        self.set_status(|s| s.devices = devices);
    }

    fn refresh(&mut self) {
        let found = scan(&self.settings, &self.config);
        self.take_scan(found);
    }

    fn take_scan(&mut self, found: Result<Vec<pool::Pool>, DiscoveryError>) {
        match found {
            Ok(pools) => self.apply(pools),
            Err(e) => {
                tracing::warn!("device discovery: {e}");
                self.set_status(|s| s.last_error = Some(e.to_string()));
            }
        }
    }

    fn reload_config(&mut self) {
        match DeviceConfig::load(&self.settings.config, &self.settings.resource_prefix) {
            Ok(c) if c == self.config => {}
            Ok(c) => {
                tracing::info!(config = %self.settings.config.display(), "device config changed");
                self.config = c;
                self.refresh();
            }
            Err(e) => {
                // A broken edit keeps the pools as they were.
                tracing::error!("{e}; keeping the previous pools");
                self.set_status(|s| s.last_error = Some(e.to_string()));
            }
        }
    }

    /// Restarts servers whose socket is gone (kubelet removes them when it starts).
    /// True when a running server's socket had vanished: a kubelet may be starting.
    fn restore_sockets(&mut self) -> bool {
        let mut vanished = false;
        let keys: Vec<String> = self.pools.keys().cloned().collect();
        for k in keys {
            let r = &self.pools[&k];
            if r.socket.exists() && r.server.is_some() {
                continue;
            }
            vanished |= r.server.is_some();
            let rx = r.state.subscribe();
            let socket = r.socket.clone();
            let server = match self.start_server(&socket, rx) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(pool = %k, "{e}");
                    None
                }
            };
            let r = self.pools.get_mut(&k).expect("present");
            if let Some(old) = r.server.take() {
                old.abort();
            }
            r.server = server;
            r.registered = false;
        }
        vanished
    }

    /// A new kubelet (its socket created, replaced or gone): no pool counts as
    /// registered with it, whatever the new socket's inode.
    fn forget_registrations(&mut self) {
        self.awaiting_kubelet = false;
        for r in self.pools.values_mut() {
            r.registered = false;
        }
    }

    /// Registers every pool not yet registered with the kubelet.sock there now.
    async fn register_pending(&mut self) -> Registered {
        let mut done = Registered::default();
        if self.awaiting_kubelet {
            return done;
        }
        let kubelet = self.settings.plugin_dir.join(KUBELET_SOCKET);
        if !kubelet.exists() {
            return done;
        }
        for (k, r) in self.pools.iter_mut() {
            if r.registered || r.server.is_none() {
                continue;
            }
            let endpoint = r
                .socket
                .file_name()
                .expect("socket name")
                .to_string_lossy()
                .into_owned();
            match register(&kubelet, &endpoint, k).await {
                Ok(()) => {
                    done.ok += 1;
                    r.registered = true;
                    tracing::info!(pool = %k, "registered with kubelet");
                    let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                    *st.registrations.entry(k.clone()).or_default() += 1;
                }
                Err(e) => {
                    done.failed += 1;
                    r.registered = false;
                    tracing::warn!(pool = %k, "cannot register with kubelet: {e}");
                    self.status
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .last_error = Some(e);
                }
            }
        }
        done
    }

    fn shutdown(&mut self) {
        for r in self.pools.values_mut() {
            if let Some(s) = r.server.take() {
                s.abort();
            }
            let _ = std::fs::remove_file(&r.socket);
        }
    }
}

/// Discovery and pool building: blocking file and socket work.
fn scan(settings: &Settings, config: &DeviceConfig) -> Result<Vec<pool::Pool>, DiscoveryError> {
    let inv = discover(settings, config)?;
    let mut pools = pool::build(config, &inv);
    if let Some(claims) = &settings.vf_claims {
        for d in pools.iter_mut().flat_map(|p| p.devices.iter_mut()) {
            let placed = matches!(&d.kind, pool::DeviceKind::Pci(p) if p.driver.is_some() && p.netdevs.is_empty())
                && claims.is_claimed(&d.id);
            if placed {
                d.health = Ok(());
            }
        }
    }
    Ok(pools)
}

/// Devices of `now` plus any seen before and gone since, marked unhealthy.
fn keep_vanished(seen: &mut BTreeMap<String, PoolDevice>, now: Vec<PoolDevice>) -> Vec<PoolDevice> {
    let mut out = now;
    for d in &out {
        if matches!(d.kind, pool::DeviceKind::VhostUser(_)) {
            seen.insert(d.id.clone(), d.clone());
        }
    }
    for (id, d) in seen.iter() {
        if !out.iter().any(|x| &x.id == id) {
            let mut gone = d.clone();
            gone.health = Err("socket is gone".into());
            out.push(gone);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

async fn register(kubelet: &Path, endpoint: &str, resource: &str) -> Result<(), String> {
    let call = async {
        let ch = crate::uds::channel(kubelet)
            .await
            .map_err(|e| e.to_string())?;
        dp::registration_client::RegistrationClient::new(ch)
            .register(dp::RegisterRequest {
                version: server::API_VERSION.into(),
                endpoint: endpoint.into(),
                resource_name: resource.into(),
                options: Some(server::options()),
            })
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .map_err(|_| "kubelet did not answer within 5 s".to_string())?
}

/// What the device-plugins dir is watched for: kubelet.sock and our sockets coming
/// and going (the dir's own removal arrives as IN_IGNORED).
fn plugin_mask() -> WatchMask {
    WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_TO | WatchMask::MOVED_FROM
}

/// Loads the config and discovers devices (errors here stop the agent from
/// starting), then runs the pools on a thread of their own.
pub fn start(settings: Settings) -> Result<ManagerHandle, ManagerError> {
    let config = DeviceConfig::load(&settings.config, &settings.resource_prefix)?;
    // The first scan here: an unreadable sysfs stops the start with its error.
    let first = scan(&settings, &config)?;
    std::fs::create_dir_all(&settings.plugin_dir).map_err(io_err(format!(
        "cannot create {}",
        settings.plugin_dir.display()
    )))?;
    let inotify = Inotify::init().map_err(io_err("inotify"))?;
    let mut plugin_wd = inotify
        .watches()
        .add(&settings.plugin_dir, plugin_mask())
        .map_err(io_err(format!(
            "cannot watch {}",
            settings.plugin_dir.display()
        )))?;
    let config_dir = settings
        .config
        .parent()
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let config_name = settings
        .config
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let config_wd = inotify
        .watches()
        .add(
            &config_dir,
            WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE,
        )
        .map_err(io_err(format!("cannot watch {}", config_dir.display())))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("trellis-devices")
        .enable_all()
        .build()
        .map_err(io_err("device plugin runtime"))?;
    // The pools are known before start returns: the CNI side checks devices
    // against them from the first ADD on.
    let status = Arc::new(Mutex::new(Status {
        devices: first
            .iter()
            .map(|p| (p.resource.full_name(), p.devices.clone()))
            .collect(),
        ..Default::default()
    }));
    let (stop_tx, mut stop_rx) = oneshot::channel();
    let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
    let plugin_dir = settings.plugin_dir.clone();
    let st = status.clone();
    let thread = std::thread::Builder::new()
        .name("trellis-devices".into())
        .spawn(move || {

            rt.block_on(async move {
                let mut m = Manager {
                    settings,
                    config,
                    pools: BTreeMap::new(),
                    status: st,
                    awaiting_kubelet: false,
                };
                m.take_scan(Ok(first));
                m.register_pending().await;
                let mut events = match inotify.into_event_stream(vec![0u8; 4096]) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!("inotify stream: {e}");
                        return;
                    }
                };
                let mut tick = tokio::time::interval(m.settings.poll_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // Periodic scans run off the loop, so kubelet restarts are answered
                // at once even while a thousand VFs are being read.
                let (scan_tx, mut scan_rx) = tokio::sync::mpsc::channel(1);
                let mut scanning = false;
                let mut watch_lost = false;
                loop {
                    tokio::select! {
                        // Stop first: a stopped manager binds no socket again.
                        biased;
                        _ = &mut stop_rx => break,
                        _ = tick.tick(), if !scanning => {
                            scanning = true;
                            let (s, c, tx) = (m.settings.clone(), m.config.clone(), scan_tx.clone());
                            tokio::task::spawn_blocking(move || {
                                let found = scan(&s, &c);
                                let _ = tx.blocking_send((c, found));
                            });
                        }
                        Some((config, found)) = scan_rx.recv() => {
                            scanning = false;
                            // A scan under a config since replaced is stale.
                            if config == m.config {
                                m.take_scan(found);
                            }
                            if watch_lost && m.settings.plugin_dir.is_dir() {
                                // The dir is back (re-created): watched again, and
                                // whatever kubelet is there now gets every pool.
                                match events.watches().add(&m.settings.plugin_dir, plugin_mask()) {
                                    Ok(wd) => {
                                        tracing::info!(dir = %m.settings.plugin_dir.display(), "device-plugins dir back: watching it again");
                                        plugin_wd = wd;
                                        watch_lost = false;
                                        m.forget_registrations();
                                    }
                                    Err(e) => tracing::warn!("cannot watch {}: {e}", m.settings.plugin_dir.display()),
                                }
                            }
                            // Sockets gone mean a kubelet starting whose events may not
                            // be read yet (its new socket can even have the old one's
                            // inode): its CREATE registers every pool, once. A socket
                            // someone else removed is registered on its DELETE event or
                            // at the next poll.
                            if !m.restore_sockets() {
                                m.register_pending().await;
                            }
                        }
                        Some(ev) = events.next() => {
                            let Ok(ev) = ev else { continue };
                            let name = ev.name.clone().unwrap_or_default();
                            if ev.wd == plugin_wd && ev.mask.contains(EventMask::IGNORED) {
                                // The dir itself went (removed, unmounted): its watch is
                                // gone; the poll watches it again once it is back.
                                tracing::warn!(dir = %m.settings.plugin_dir.display(), "device-plugins dir gone; waiting for it to come back");
                                watch_lost = true;
                                m.forget_registrations();
                                continue;
                            }
                            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                                // Events were lost: one of them may have been a restart.
                                tracing::warn!("inotify queue overflowed; registering every pool again");
                                m.forget_registrations();
                                m.reload_config();
                                m.restore_sockets();
                                m.register_pending().await;
                                continue;
                            }
                            if ev.wd == plugin_wd && name == KUBELET_SOCKET
                                && (ev.mask.contains(EventMask::CREATE) || ev.mask.contains(EventMask::MOVED_TO))
                            {
                                // kubelet (re)started: every plugin registers again.
                                let t = Instant::now();
                                m.forget_registrations();
                                m.restore_sockets();
                                let mut done = m.register_pending().await;
                                // The socket exists from bind(); kubelet may not listen
                                // yet: a few quick tries before the poll takes over.
                                let mut wait = Duration::from_millis(20);
                                while done.failed > 0 && wait <= Duration::from_millis(320) {
                                    tokio::time::sleep(wait).await;
                                    wait *= 2;
                                    let again = m.register_pending().await;
                                    done = Registered { ok: done.ok + again.ok, failed: again.failed };
                                }
                                let micros = t.elapsed().as_micros() as u64;
                                if done.failed == 0 {
                                    tracing::info!(pools = done.ok, micros, "re-registered after kubelet restart");
                                } else {
                                    tracing::warn!(pools = done.ok, failed = done.failed, micros,
                                        "kubelet restarted; some pools not registered yet (retried every poll)");
                                }
                            } else if ev.wd == plugin_wd && name == KUBELET_SOCKET {
                                // kubelet gone: whatever socket comes next is a new kubelet.
                                m.forget_registrations();
                                m.awaiting_kubelet = true;
                            } else if ev.wd == plugin_wd && ev.mask.contains(EventMask::DELETE) {
                                m.restore_sockets();
                                m.register_pending().await;
                            }
                            if ev.wd == config_wd && (name == config_name || name.to_string_lossy().starts_with("..data")) {
                                m.reload_config();
                                m.restore_sockets();
                                m.register_pending().await;
                            }
                        }
                    }
                }
                m.shutdown();
                let _ = stopped_tx.send(());
            });
            // A periodic scan may still be reading sysfs: not waited for.
            rt.shutdown_background();
        })
        .map_err(io_err("device plugin thread"))?;
    Ok(ManagerHandle {
        stop: Some(stop_tx),
        thread: Some(thread),
        stopped: stopped_rx,
        plugin_dir,
        status,
    })
}
