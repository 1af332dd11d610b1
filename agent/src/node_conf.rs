//! The node's CNI conf dir: which conf is the node's primary network, the conflist
//! that puts trellis in front of it, `trellis install` / `uninstall`, and following
//! the primary conf when it changes (Multus' `multusConfigFile: auto`).

use crate::config::{AgentConfig, DefaultNetwork};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use trellis_cni::NetConfList;

/// The plugin type of the shim: a conf using it is trellis's, never a primary.
pub const SHIM_TYPE: &str = "trellis-cni";
/// The runtime passes the pod's annotations only to plugins that declare this.
pub const POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";
/// cniVersion of the conflist when no conf says one (a NAD default network).
const FALLBACK_VERSION: &str = "1.0.0";

#[derive(Debug, thiserror::Error)]
pub enum NodeConfError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no primary CNI conf in {0} (the cluster network has not written one yet)")]
    NoPrimary(PathBuf),
    /// The first conf is there but the runtime could not load it either (containerd
    /// takes the first file and fails on it; it does not skip to the next).
    #[error("the primary CNI conf {path} cannot be loaded: {message}")]
    BadPrimary { path: PathBuf, message: String },
    #[error("{other} sorts before {ours} in {dir}: the runtime takes the first conf, so trellis would not be called; set cni_conf_file = {suggest:?} (a name that sorts first)")]
    NotFirst {
        dir: PathBuf,
        ours: String,
        other: String,
        suggest: String,
    },
    #[error("{path}: {message}")]
    Conf { path: PathBuf, message: String },
    #[error("{path} is not trellis's (no {SHIM_TYPE} plugin in it); left alone")]
    NotOurs { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} is larger than {MAX_CONF} bytes")]
    TooLarge { path: PathBuf },
    #[error("{0} is held: a trellis agent runs with this state_dir; stop it first (delete the DaemonSet, or stop the service)")]
    AgentRunning(PathBuf),
}

impl NodeConfError {
    /// Node boot: the cluster network's conf is not there (or not whole) yet.
    pub fn is_not_yet(&self) -> bool {
        matches!(
            self,
            NodeConfError::NoPrimary(_) | NodeConfError::BadPrimary { .. }
        )
    }
}

/// No CNI conf is this large; a bigger file is not read.
pub const MAX_CONF: u64 = 1 << 20;

/// Reads a file of the conf dir as the runtime would (symlinks followed), but only a
/// regular file, without blocking (a FIFO there would hang `install`), and capped.
pub fn read_conf_file(path: &Path) -> Result<Vec<u8>, NodeConfError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits() | nix::fcntl::OFlag::O_NOCTTY.bits())
        .open(path)
        .map_err(io(path))?;
    if !f.metadata().map_err(io(path))?.is_file() {
        return Err(NodeConfError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut bytes = Vec::new();
    f.take(MAX_CONF + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > MAX_CONF {
        return Err(NodeConfError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeConfError + '_ {
    move |source| NodeConfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The node's primary network conf.
#[derive(Debug, Clone)]
pub struct Primary {
    pub path: PathBuf,
    pub conf: NetConfList,
    /// Capabilities any of its plugins declares (`"capabilities": {"x": true}`).
    pub capabilities: BTreeSet<String>,
}

/// Conf file names in `dir`, in the order the runtime reads them (libcni: byte order,
/// these extensions).
fn conf_files(dir: &Path) -> Result<Vec<String>, NodeConfError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            Path::new(n)
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["conf", "conflist", "json"].contains(&e))
        })
        .collect();
    names.sort();
    Ok(names)
}

fn plugins_of(v: &Value) -> Vec<&Map<String, Value>> {
    match v.get("plugins").and_then(Value::as_array) {
        Some(list) => list.iter().filter_map(Value::as_object).collect(),
        None => v.as_object().into_iter().collect(),
    }
}

fn is_ours(v: &Value) -> bool {
    plugins_of(v)
        .iter()
        .any(|p| p.get("type").and_then(Value::as_str) == Some(SHIM_TYPE))
}

/// Reads one conf file as the primary network, by the runtime's rules: a `.conflist`
/// has a non-empty `plugins` list, a `.conf`/`.json` is one plugin with a `type`.
pub fn read_primary(path: &Path) -> Result<Primary, NodeConfError> {
    let bytes = read_conf_file(path)?;
    let bad = |message: String| NodeConfError::BadPrimary {
        path: path.to_path_buf(),
        message,
    };
    let raw: Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if is_ours(&raw) {
        return Err(bad(format!(
            "it calls {SHIM_TYPE}: trellis cannot be its own default network"
        )));
    }
    let is_list = path.extension().and_then(|e| e.to_str()) == Some("conflist");
    match (is_list, raw.get("plugins")) {
        (true, None) => return Err(bad("a .conflist needs a \"plugins\" list".into())),
        (false, _) if raw.get("type").and_then(Value::as_str).is_none() => {
            return Err(bad(
                "a .conf needs a \"type\" (a conflist belongs in a .conflist file)".into(),
            ))
        }
        _ => {}
    }
    let conf = NetConfList::parse(&bytes, None).map_err(|e| bad(e.to_string()))?;
    let capabilities = plugins_of(&raw)
        .iter()
        .filter_map(|p| p.get("capabilities").and_then(Value::as_object))
        .flat_map(|c| c.iter())
        .filter(|(_, on)| on.as_bool() == Some(true))
        .map(|(k, _)| k.clone())
        .collect();
    Ok(Primary {
        path: path.to_path_buf(),
        conf,
        capabilities,
    })
}

/// Whether a conf dir file calls the shim (an unreadable one does not).
fn file_is_ours(path: &Path) -> bool {
    read_conf_file(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| is_ours(&v))
}

/// The node's primary network: the first conf in `dir` that is not trellis's, as the
/// runtime would pick it without trellis. If that one cannot be loaded there is no
/// primary (the runtime would not skip to the next file either).
pub fn find_primary(dir: &Path, own_file: &str) -> Result<Primary, NodeConfError> {
    for name in conf_files(dir)? {
        let path = dir.join(&name);
        if name == own_file || file_is_ours(&path) {
            continue;
        }
        return read_primary(&path);
    }
    Err(NodeConfError::NoPrimary(dir.to_path_buf()))
}

/// trellis's conflist: the shim, with the default network's cniVersion and
/// capabilities plus the pod annotations.
pub fn conflist(cni_version: &str, capabilities: &BTreeSet<String>, socket: &Path) -> Value {
    let mut caps: Map<String, Value> = capabilities
        .iter()
        .map(|c| (c.clone(), Value::Bool(true)))
        .collect();
    caps.insert(POD_ANNOTATIONS.into(), Value::Bool(true));
    json!({
        "cniVersion": cni_version,
        "name": "trellis",
        "plugins": [{"type": SHIM_TYPE, "socket": socket, "capabilities": caps}],
    })
}

/// What the conflist should be now, from the config and the conf dir.
pub fn desired(config: &AgentConfig) -> Result<Value, NodeConfError> {
    let (version, caps) = match &config.default_network {
        DefaultNetwork::Auto => {
            let p = find_primary(&config.cni_conf_dir, &config.cni_conf_file)?;
            (p.conf.cni_version, p.capabilities)
        }
        DefaultNetwork::File(f) => {
            let p = read_primary(f)?;
            (p.conf.cni_version, p.capabilities)
        }
        DefaultNetwork::Nad { .. } => (FALLBACK_VERSION.to_string(), BTreeSet::new()),
    };
    let version = config.cni_version.clone().unwrap_or(version);
    Ok(conflist(&version, &caps, &config.socket))
}

/// A name for trellis's conflist that sorts before `other`.
fn name_before(other: &str) -> String {
    [
        "0-trellis.conflist",
        "-trellis.conflist",
        "!trellis.conflist",
    ]
    .into_iter()
    .find(|n| *n < other)
    .unwrap_or("!trellis.conflist")
    .to_string()
}

/// Fails if another conf sorts before trellis's: the runtime would never call it.
pub fn check_first(dir: &Path, own_file: &str) -> Result<(), NodeConfError> {
    match conf_files(dir)?.into_iter().find(|n| n.as_str() < own_file) {
        Some(other) => Err(NodeConfError::NotFirst {
            dir: dir.to_path_buf(),
            ours: own_file.to_string(),
            suggest: name_before(&other),
            other,
        }),
        None => Ok(()),
    }
}

/// The prefix of temp files trellis writes in a dir (no conf extension, so no runtime
/// loads one).
fn tmp_prefix(name: &str) -> String {
    format!(".{name}.trellis-tmp-")
}

/// Writes `bytes` to `path` by a temp file in the same dir and a rename, so nothing
/// ever reads a half-written file (a runtime exec'ing a half-copied binary: Multus
/// #1221). The temp file is created new (never through a link planted there).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NodeConfError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!("{}{}", tmp_prefix(&name), std::process::id()));
    // One left by an install killed mid-write with this PID (a container's PID 1).
    let _ = std::fs::remove_file(&tmp);
    let mut created = false;
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        created = true;
        f.write_all(bytes).map_err(io(&tmp))?;
        // The mode asked for, whatever the umask.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() && created {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the temp files of installs killed mid-write from `dir`.
fn remove_stale_temps(dir: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = tmp_prefix(name);
    let mut removed = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.strip_prefix(&prefix)
            .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed.push(e.path());
        }
    }
    removed
}

/// What [`sync_conflist`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    Unchanged,
    Written,
    /// There was no conflist and `create` was not asked for.
    Missing,
}

/// Makes trellis's conflist what it should be now. Only `install` creates it; the
/// agent only updates one that is there (after `uninstall` it stays gone). A file of
/// that name that trellis did not write is never replaced.
pub fn sync_conflist(config: &AgentConfig, create: bool) -> Result<Synced, NodeConfError> {
    let want = desired(config)?;
    check_first(&config.cni_conf_dir, &config.cni_conf_file)?;
    let path = config.cni_conf_dir.join(&config.cni_conf_file);
    let have: Value = match read_conf_file(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
        Err(NodeConfError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Ok(Synced::Missing);
            }
            Value::Null
        }
        Err(e) => return Err(e),
    };
    if have == want {
        return Ok(Synced::Unchanged);
    }
    if !have.is_null() && !is_ours(&have) || have.is_null() && path.exists() {
        return Err(NodeConfError::NotOurs { path });
    }
    let mut text = serde_json::to_vec_pretty(&want).expect("JSON value");
    text.push(b'\n');
    write_atomic(&path, &text, 0o644)?;
    Ok(Synced::Written)
}

/// Whether the node's conf is what trellis needs to be called: its conflist there,
/// trellis's, and first (`/readyz`, for an agent that follows the primary conf).
pub fn check_installed(dir: &Path, file: &str) -> Result<(), NodeConfError> {
    let path = dir.join(file);
    if !file_is_ours(&path) {
        return Err(match read_conf_file(&path) {
            Err(e) => e,
            Ok(_) => NodeConfError::NotOurs { path },
        });
    }
    check_first(dir, file)
}

/// `trellis install`: the shim into `bin_dir`, then (after waiting for a primary conf,
/// in auto mode, up to `wait`, or for ever) trellis's conflist into the conf dir.
pub fn install(
    config: &AgentConfig,
    shim: &Path,
    bin_dir: &Path,
    wait: Option<Duration>,
) -> Result<(), NodeConfError> {
    for (dir, name) in [
        (bin_dir, SHIM_TYPE),
        (config.cni_conf_dir.as_path(), config.cni_conf_file.as_str()),
    ] {
        if !dir.is_dir() {
            return Err(io(dir)(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such directory (is the host's dir mounted there?)",
            )));
        }
        remove_stale_temps(dir, name);
    }
    let bytes = std::fs::read(shim).map_err(io(shim))?;
    let target = bin_dir.join(SHIM_TYPE);
    write_atomic(&target, &bytes, 0o755)?;
    tracing::info!(path = %target.display(), "installed the CNI shim");
    let started = std::time::Instant::now();
    let mut last_log = None::<(std::time::Instant, String)>;
    loop {
        match sync_conflist(config, true) {
            Ok(synced) => {
                let path = config.cni_conf_dir.join(&config.cni_conf_file);
                tracing::info!(path = %path.display(), written = synced == Synced::Written,
                    "trellis is the node's CNI config");
                return Ok(());
            }
            // Node boot: the cluster network's own DaemonSet has not written its conf
            // yet. Waiting here keeps pods from starting without it (Multus #1387).
            Err(e) if e.is_not_yet() => {
                if wait.is_some_and(|w| started.elapsed() >= w) {
                    return Err(e);
                }
                let msg = e.to_string();
                if last_log
                    .as_ref()
                    .is_none_or(|(t, m)| *m != msg || t.elapsed() >= Duration::from_secs(10))
                {
                    tracing::info!("{msg}; waiting");
                    last_log = Some((std::time::Instant::now(), msg));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Fails if an agent holds `state_dir/agent.lock`.
fn check_no_agent(state_dir: &Path) -> Result<(), NodeConfError> {
    let path = state_dir.join("agent.lock");
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(&path)(e)),
    };
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(_) => Ok(()),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(NodeConfError::AgentRunning(path)),
        Err((_, e)) => Err(io(&path)(e.into())),
    }
}

/// `trellis uninstall`: removes trellis's conflist (only if it is trellis's) and the
/// shim (unless another conf still calls it); the primary conf was never changed, so
/// the node is as it was. Refused while an agent runs with this state dir.
pub fn uninstall(config: &AgentConfig, bin_dir: &Path) -> Result<Vec<PathBuf>, NodeConfError> {
    check_no_agent(&config.state_dir)?;
    let dir = &config.cni_conf_dir;
    if !dir.is_dir() {
        return Err(io(dir)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such directory (is the host's dir mounted there?)",
        )));
    }
    let mut removed = Vec::new();
    let conf = dir.join(&config.cni_conf_file);
    match read_conf_file(&conf) {
        Ok(b) => {
            let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
            if !is_ours(&v) {
                return Err(NodeConfError::NotOurs { path: conf });
            }
            std::fs::remove_file(&conf).map_err(io(&conf))?;
            removed.push(conf);
        }
        Err(NodeConfError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    removed.extend(remove_stale_temps(dir, &config.cni_conf_file));
    // Another conflist calling the shim (a second trellis conf name) still needs it.
    let still_used = conf_files(dir)?
        .into_iter()
        .find(|n| file_is_ours(&dir.join(n)));
    let shim = bin_dir.join(SHIM_TYPE);
    match still_used {
        Some(n) => tracing::warn!(
            "{} still calls {SHIM_TYPE}: {} left in place",
            dir.join(n).display(),
            shim.display()
        ),
        None => match std::fs::remove_file(&shim) {
            Ok(()) => removed.push(shim),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&shim)(e)),
        },
    }
    removed.extend(remove_stale_temps(bin_dir, SHIM_TYPE));
    Ok(removed)
}

/// Keeps trellis's conflist following the primary conf (auto mode): on every change
/// in the conf dir (inotify, and a slow poll for what inotify misses, such as the dir
/// itself being replaced), until `stop` is set.
pub fn follow(config: AgentConfig, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    std::thread::Builder::new()
        .name("trellis-confdir".into())
        .spawn(move || {
            use inotify::{Inotify, WatchMask};
            let mut last = String::new();
            let mut primary: Option<PathBuf> = None;
            let mut inotify = Inotify::init().ok();
            let mask = WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::DELETE_SELF
                | WatchMask::MOVE_SELF;
            let mut watching = false;
            let mut buf = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if !watching {
                    watching = inotify
                        .as_mut()
                        .is_some_and(|i| i.watches().add(&config.cni_conf_dir, mask).is_ok());
                }
                if let Ok(p) = find_primary(&config.cni_conf_dir, &config.cni_conf_file) {
                    if primary.as_ref() != Some(&p.path) {
                        tracing::info!(path = %p.path.display(), "the node's primary CNI conf");
                        primary = Some(p.path);
                    }
                }
                let (msg, warn) = match sync_conflist(&config, false) {
                    Ok(Synced::Written) => {
                        tracing::info!(
                            dir = %config.cni_conf_dir.display(),
                            "the primary CNI conf changed: {} rewritten",
                            config.cni_conf_file
                        );
                        (String::new(), false)
                    }
                    Ok(Synced::Unchanged) => (String::new(), false),
                    Ok(Synced::Missing) => (
                        format!(
                            "{} is gone (uninstalled?); not re-created: `trellis install` writes it",
                            config.cni_conf_dir.join(&config.cni_conf_file).display()
                        ),
                        true,
                    ),
                    Err(e) => (format!("node CNI config: {e}"), true),
                };
                if msg != last {
                    if warn {
                        tracing::warn!("{msg}");
                    }
                    last = msg;
                }
                wait_for_change(inotify.as_mut(), &mut buf, &mut watching);
            }
        })
        .expect("spawning the conf dir watcher");
}

/// Blocks until the conf dir changes (or 5 s pass); a little more for the writer of a
/// burst of changes to finish.
fn wait_for_change(inotify: Option<&mut inotify::Inotify>, buf: &mut [u8], watching: &mut bool) {
    use std::os::fd::AsFd;
    let Some(i) = inotify.filter(|_| *watching) else {
        std::thread::sleep(Duration::from_secs(5));
        return;
    };
    let mut fds = [nix::poll::PollFd::new(
        i.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    if matches!(nix::poll::poll(&mut fds, 5000u16), Ok(n) if n > 0) {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(events) = i.read_events(buf) {
            for e in events {
                if e.mask.intersects(
                    inotify::EventMask::DELETE_SELF
                        | inotify::EventMask::MOVE_SELF
                        | inotify::EventMask::IGNORED,
                ) {
                    *watching = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, default_network: &str) -> AgentConfig {
        AgentConfig::parse(
            &format!(
                "default_network = {default_network}\ncni_conf_dir = {dir:?}\nstate_dir = {:?}\nsocket = \"/run/t.sock\"\n[networks]\nsource = \"files\"\ndir = \"/d\"\n",
                dir.join("state")
            ),
            Path::new("t.toml"),
        )
        .unwrap()
    }

    fn read_json(p: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    #[test]
    fn auto_mode_wraps_the_first_conf_that_is_not_ours() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path(), "\"auto\"");
        let ours = d.path().join("00-trellis.conflist");
        assert!(matches!(desired(&c), Err(NodeConfError::NoPrimary(_))));
        std::fs::write(d.path().join("README"), "not a conf").unwrap();
        std::fs::write(
            d.path().join("10-calico.conflist"),
            r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"portmap","capabilities":{"portMappings":true}},{"type":"bandwidth","capabilities":{"bandwidth":true,"other":false}}]}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("20-flannel.conf"),
            r#"{"cniVersion":"0.3.1","name":"f","type":"flannel"}"#,
        )
        .unwrap();
        let p = find_primary(d.path(), "00-trellis.conflist").unwrap();
        assert_eq!(p.conf.name, "k8s-pod-network");
        // The agent never creates it; install does.
        assert_eq!(sync_conflist(&c, false).unwrap(), Synced::Missing);
        assert!(!ours.exists());
        assert_eq!(sync_conflist(&c, true).unwrap(), Synced::Written);
        let written = read_json(&ours);
        assert_eq!(written["cniVersion"], "1.1.0");
        assert_eq!(written["plugins"][0]["type"], SHIM_TYPE);
        assert_eq!(written["plugins"][0]["socket"], "/run/t.sock");
        assert_eq!(
            written["plugins"][0]["capabilities"],
            json!({"bandwidth": true, "portMappings": true, POD_ANNOTATIONS: true})
        );
        check_installed(&c.cni_conf_dir, &c.cni_conf_file).unwrap();
        // Unchanged: not written again. Our own file is never the primary.
        assert_eq!(sync_conflist(&c, false).unwrap(), Synced::Unchanged);
        std::fs::remove_file(d.path().join("10-calico.conflist")).unwrap();
        assert_eq!(sync_conflist(&c, false).unwrap(), Synced::Written);
        assert_eq!(read_json(&ours)["cniVersion"], "0.3.1");
    }

    #[test]
    fn a_first_conf_the_runtime_cannot_load_means_no_primary() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path(), "\"auto\"");
        std::fs::write(
            d.path().join("20-flannel.conf"),
            r#"{"cniVersion":"0.3.1","name":"f","type":"flannel"}"#,
        )
        .unwrap();
        assert_eq!(sync_conflist(&c, true).unwrap(), Synced::Written);
        let before = std::fs::read(d.path().join("00-trellis.conflist")).unwrap();
        // Each of these, sorting first, is what containerd would fail on: trellis
        // does not skip to the next file, and keeps its conflist as it was.
        for (name, text) in [
            ("05-broken.conf", "{"),
            (
                "05-list.conflist",
                r#"{"cniVersion":"1.0.0","name":"x","type":"bridge"}"#,
            ),
            (
                "05-empty.conflist",
                r#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
            ),
            (
                "05-notype.conf",
                r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}"#,
            ),
            (
                "05-version.conf",
                r#"{"cniVersion":"9.9.9","name":"x","type":"bridge"}"#,
            ),
        ] {
            let p = d.path().join(name);
            std::fs::write(&p, text).unwrap();
            let e = sync_conflist(&c, false).unwrap_err();
            assert!(
                matches!(&e, NodeConfError::BadPrimary { path, .. } if *path == p),
                "{name}: {e}"
            );
            assert!(e.is_not_yet());
            std::fs::remove_file(&p).unwrap();
        }
        // A FIFO is not read (install would hang on it).
        let fifo = d.path().join("05-fifo.conf");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = sync_conflist(&c, false).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_file(&fifo).unwrap();
        assert_eq!(
            std::fs::read(d.path().join("00-trellis.conflist")).unwrap(),
            before
        );
    }

    #[test]
    fn a_conf_sorting_first_is_refused_with_a_name_that_would_sort_first() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path(), "\"auto\"");
        std::fs::write(
            d.path().join("00-calico.conf"),
            r#"{"cniVersion":"1.0.0","name":"c","type":"calico"}"#,
        )
        .unwrap();
        let e = sync_conflist(&c, true).unwrap_err();
        let NodeConfError::NotFirst { suggest, .. } = &e else {
            panic!("{e}")
        };
        assert!(
            e.to_string()
                .contains("00-calico.conf sorts before 00-trellis.conflist"),
            "{e}"
        );
        assert!(suggest.as_str() < "00-calico.conf", "{suggest}");
        assert!(!d.path().join("00-trellis.conflist").exists());
    }

    #[test]
    fn a_file_of_that_name_trellis_did_not_write_is_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path(), "\"auto\"");
        std::fs::write(
            d.path().join("10-bridge.conf"),
            r#"{"cniVersion":"1.0.0","name":"b","type":"bridge"}"#,
        )
        .unwrap();
        let theirs = d.path().join("00-trellis.conflist");
        std::fs::write(
            &theirs,
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        for create in [true, false] {
            assert!(matches!(
                sync_conflist(&c, create),
                Err(NodeConfError::NotOurs { .. })
            ));
        }
        assert!(check_installed(&c.cni_conf_dir, &c.cni_conf_file).is_err());
    }

    #[test]
    fn a_conf_calling_the_shim_is_never_the_primary() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path(), "\"auto\"");
        std::fs::write(
            d.path().join("10-old-trellis.conflist"),
            conflist("1.0.0", &BTreeSet::new(), Path::new("/x")).to_string(),
        )
        .unwrap();
        assert!(matches!(desired(&c), Err(NodeConfError::NoPrimary(_))));
    }

    #[test]
    fn install_waits_then_uninstall_removes_only_what_is_ours() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("net.d");
        let bin = d.path().join("bin");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let shim = d.path().join("shim");
        std::fs::write(&shim, b"#!/bin/sh\n").unwrap();
        // A temp file of an install killed mid-copy goes.
        std::fs::write(bin.join(".trellis-cni.trellis-tmp-7"), b"half").unwrap();
        let mut c = config(&conf, "\"auto\"");
        c.state_dir = d.path().join("state");
        let e = install(&c, &shim, &bin, Some(Duration::from_millis(300))).unwrap_err();
        assert!(matches!(e, NodeConfError::NoPrimary(_)), "{e}");
        let primary = conf.join("10-bridge.conf");
        let writer = {
            let primary = primary.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                std::fs::write(
                    primary,
                    r#"{"cniVersion":"1.0.0","name":"b","type":"bridge"}"#,
                )
                .unwrap();
            })
        };
        install(&c, &shim, &bin, None).unwrap();
        writer.join().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bin.join(SHIM_TYPE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let bins: Vec<_> = std::fs::read_dir(&bin)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(bins, [SHIM_TYPE]);
        assert!(conf.join("00-trellis.conflist").exists());
        // Not while an agent holds the state dir's lock.
        std::fs::create_dir_all(&c.state_dir).unwrap();
        let lock = std::fs::File::create(c.state_dir.join("agent.lock")).unwrap();
        let held =
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
        let e = uninstall(&c, &bin).unwrap_err();
        assert!(matches!(e, NodeConfError::AgentRunning(_)), "{e}");
        drop(held);
        // Another conf still calling the shim keeps it.
        std::fs::write(
            conf.join("90-other-trellis.conflist"),
            conflist("1.0.0", &BTreeSet::new(), Path::new("/x")).to_string(),
        )
        .unwrap();
        let removed = uninstall(&c, &bin).unwrap();
        assert_eq!(removed, [conf.join("00-trellis.conflist")]);
        assert!(bin.join(SHIM_TYPE).exists());
        std::fs::remove_file(conf.join("90-other-trellis.conflist")).unwrap();
        let removed = uninstall(&c, &bin).unwrap();
        assert_eq!(removed, [bin.join(SHIM_TYPE)]);
        let left: Vec<_> = std::fs::read_dir(&conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["10-bridge.conf"]);
        assert_eq!(std::fs::read_dir(&bin).unwrap().count(), 0);
        // A file of that name that trellis did not write stays.
        std::fs::write(conf.join("00-trellis.conflist"), r#"{"type":"bridge"}"#).unwrap();
        assert!(matches!(
            uninstall(&c, &bin),
            Err(NodeConfError::NotOurs { .. })
        ));
        // A conf dir that is not there is an error, not a clean node.
        let mut gone = c.clone();
        gone.cni_conf_dir = d.path().join("nope");
        assert!(uninstall(&gone, &bin).is_err());
    }

    #[test]
    fn default_network_forms() {
        let d = tempfile::tempdir().unwrap();
        let nad = config(d.path(), "{ nad = \"kube-system/calico\" }");
        assert_eq!(
            nad.default_network,
            DefaultNetwork::Nad {
                namespace: "kube-system".into(),
                name: "calico".into()
            }
        );
        for bad in [
            "\"calico.conf\"",
            "{ nad = \"calico\" }",
            "{ nad = \"a/b\", x = 1 }",
        ] {
            let e = AgentConfig::parse(
                &format!("default_network = {bad}\n[networks]\nsource = \"files\"\ndir = \"/d\"\n"),
                Path::new("t.toml"),
            );
            assert!(e.is_err(), "{bad} was taken");
        }
    }
}
