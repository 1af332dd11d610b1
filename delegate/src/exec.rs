//! Running one CNI plugin: a binary found by bare name in the bin dirs (through a host
//! process's root when the agent runs in a container), with the CNI environment, a
//! timeout, its process group killed on expiry, and its output bounded. A type an
//! `InProcessPlugins` handles (the agent's SR-IOV and vhost-user kinds) is handed to it
//! instead, with the same stdin and target a binary would get.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use trellis_cni::env::Command as CniCommand;
use trellis_cni::error::CniError;
use trellis_cni::result::ResultError;

/// The most a plugin may print on stdout before its output is called malformed.
const MAX_PLUGIN_OUTPUT: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("CNI plugin name {plugin:?}: {reason}")]
    BadName { plugin: String, reason: String },
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    NotFound { plugin: String, dirs: String },
    #[error("cannot run CNI plugin {path}: {source}")]
    Spawn {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin:?} ({command}) failed and could not undo all it did (a DEL is owed): {error}")]
    Unfinished {
        plugin: String,
        command: &'static str,
        error: Box<CniError>,
    },
    #[error("CNI plugin {plugin:?} ({command}) did not finish within {secs} s and was killed")]
    Timeout {
        plugin: String,
        command: &'static str,
        secs: u64,
    },
    #[error("CNI plugin {plugin:?} ({command}) failed: {error}")]
    Plugin {
        plugin: String,
        command: &'static str,
        error: Box<CniError>,
    },
    #[error("CNI plugin {plugin:?} ({command}) failed with {status} and no error JSON: {output}")]
    Crashed {
        plugin: String,
        command: &'static str,
        status: String,
        output: String,
    },
    #[error("CNI plugin {plugin:?} returned an invalid result: {source}")]
    BadResult {
        plugin: String,
        #[source]
        source: ResultError,
    },
}

impl InvokeError {
    /// The CNI error to hand on: a plugin's own code is kept, the rest are I/O failures.
    pub fn to_cni_error(&self, context: &str) -> CniError {
        let code = match self {
            InvokeError::Plugin { error, .. } | InvokeError::Unfinished { error, .. } => error.code,
            InvokeError::NotFound { .. } | InvokeError::BadName { .. } => {
                trellis_cni::ErrorCode::InvalidNetworkConfig as u32
            }
            _ => trellis_cni::ErrorCode::Io as u32,
        };
        CniError {
            cni_version: trellis_cni::version::CURRENT.to_string(),
            code,
            msg: format!("{context}: {self}"),
            details: String::new(),
        }
    }

    /// Whether the failed plugin may have left something that a DEL must undo: one
    /// killed on timeout, crashed, or answered garbage did not clean up. One that
    /// reported its error cleaned up after itself (CNI spec), and one never started
    /// made nothing.
    pub fn needs_del(&self) -> bool {
        matches!(
            self,
            InvokeError::Timeout { .. }
                | InvokeError::Crashed { .. }
                | InvokeError::BadResult { .. }
                | InvokeError::Unfinished { .. }
        )
    }
}

/// How long to wait for a killed plugin's pipes to close: a process that left the
/// plugin's process group may hold them open for ever.
const AFTER_KILL: Duration = Duration::from_secs(2);

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// What the runtime told us about the container, passed on to every plugin.
#[derive(Debug, Clone, Default)]
pub struct Target<'a> {
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    /// CNI_ARGS as a string.
    pub args: &'a str,
}

/// Plugin types the host program runs itself instead of exec'ing a binary: it gets
/// exactly the stdin and target a binary would, and answers with its stdout.
pub trait InProcessPlugins: Send + Sync + std::fmt::Debug {
    fn handles(&self, plugin: &str) -> bool;
    fn exec(
        &self,
        plugin: &str,
        command: CniCommand,
        target: &Target,
        stdin: &[u8],
    ) -> Result<Vec<u8>, InvokeError>;
}

/// Finds and runs plugin binaries from a list of directories.
#[derive(Debug, Clone)]
pub struct Invoker {
    pub bin_dirs: Vec<PathBuf>,
    pub timeout: Duration,
    pub in_process: Option<std::sync::Arc<dyn InProcessPlugins>>,
    /// A host process's /proc dir when this program runs in a container: plugins are
    /// looked up through its root and run in its mount namespace, so `bin_dirs` and
    /// whatever a plugin reads (its config, a kubeconfig) are the host's.
    pub host_process: Option<PathBuf>,
}

impl Invoker {
    /// The binary for `plugin`: a bare file name looked up in the bin dirs, never a
    /// path (checked here too, whatever the caller checked).
    pub fn find(&self, plugin: &str) -> Result<PathBuf, InvokeError> {
        trellis_cni::conf::check_plugin_name(plugin).map_err(|reason| InvokeError::BadName {
            plugin: plugin.to_string(),
            reason,
        })?;
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| match &self.host_process {
                Some(h) => crate::host::is_file_in_root(&h.join("root"), p),
                None => p.is_file(),
            })
            .ok_or_else(|| InvokeError::NotFound {
                plugin: plugin.to_string(),
                dirs: self.path_var(),
            })
    }

    fn path_var(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Runs one plugin; returns its stdout when it exits 0.
    pub fn exec(
        &self,
        plugin: &str,
        command: CniCommand,
        target: &Target,
        stdin: &[u8],
    ) -> Result<Vec<u8>, InvokeError> {
        if let Some(ip) = self.in_process.as_ref().filter(|ip| ip.handles(plugin)) {
            return ip.exec(plugin, command, target, stdin);
        }
        let path = self.find(plugin)?;
        let mut cmd = Command::new(&path);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("CNI_COMMAND", command.as_str())
            .env("CNI_CONTAINERID", target.container_id)
            .env("CNI_NETNS", target.netns)
            .env("CNI_IFNAME", target.ifname)
            .env("CNI_ARGS", target.args)
            .env("CNI_PATH", self.path_var())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group, so a timeout kills whatever the plugin started too.
            .process_group(0);
        let host_ns = match &self.host_process {
            Some(h) => {
                let ns_path = h.join("ns/mnt");
                Some(
                    std::fs::File::open(&ns_path).map_err(|source| InvokeError::Spawn {
                        path: ns_path.display().to_string(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let agent = nix::unistd::getpid();
        // SAFETY: between fork and exec only async-signal-safe calls: prctl(2),
        // getppid(2), setns(2) on an fd opened before the fork, chdir(2).
        unsafe {
            cmd.pre_exec(move || {
                // A plugin dies with the agent (killed, crashed, upgraded) instead of
                // finishing an ADD no one will read, after the DEL that would have
                // undone it. The thread that forks waits for the plugin, so only the
                // agent's death (not a thread's) sends it. If the agent died before
                // this, the plugin's parent is already someone else: stop here.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                if nix::unistd::getppid() != agent {
                    // No allocation between fork and exec: a plain errno.
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                if let Some(ns) = &host_ns {
                    // The host's mount namespace: the container's cwd is not in its tree.
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNS)?;
                    nix::unistd::chdir("/")?;
                }
                Ok(())
            });
        }
        // ETXTBSY: the binary is still open for writing somewhere (being installed, or a
        // fork of this process that has not exec'd yet held the writer's fd); it passes.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e)
                    if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32)
                        && tries < 10 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10 * tries));
                }
                r => {
                    break r.map_err(|source| InvokeError::Spawn {
                        // setns or chdir failing in the child comes back as the spawn's
                        // error: say where it ran.
                        path: match &self.host_process {
                            Some(h) => format!(
                                "{} in the mount namespace of {} (entering it needs a privileged container with the host's PID namespace)",
                                path.display(),
                                h.display()
                            ),
                            None => path.display().to_string(),
                        },
                        source,
                    })?;
                }
            }
        };
        let pid = child.id() as i32;
        let mut child_stdin = child.stdin.take().expect("piped");
        let input = stdin.to_vec();
        std::thread::spawn(move || {
            // A plugin may exit without reading its stdin; a broken pipe is its business.
            let _ = child_stdin.write_all(&input);
        });
        let mut child_stderr = child.stderr.take().expect("piped");
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut child_stderr).take(64 << 10).read_to_end(&mut buf);
            let _ = err_tx.send(buf);
        });
        let mut child_stdout = child.stdout.take().expect("piped");
        let (out_tx, out_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = (&mut child_stdout)
                .take(MAX_PLUGIN_OUTPUT)
                .read_to_end(&mut out);
            let _ = out_tx.send(out);
        });
        // Reaped as soon as it exits, whoever holds its pipes.
        let (st_tx, st_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = st_tx.send(child.wait());
        });
        let status = match st_rx.recv_timeout(self.timeout) {
            Ok(v) => v,
            Err(_) => {
                // The plugin's own process group: whatever it started goes too.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = st_rx.recv_timeout(AFTER_KILL);
                return Err(InvokeError::Timeout {
                    plugin: plugin.to_string(),
                    command: command.as_str(),
                    secs: self.timeout.as_secs(),
                });
            }
        };
        // Its stdout closes when it exits, unless a process it started (and that left
        // its group) holds it: then what it printed is not waited for.
        let out = match out_rx.recv_timeout(AFTER_KILL) {
            Ok(out) => out,
            Err(_) => {
                return Err(InvokeError::Crashed {
                    plugin: plugin.to_string(),
                    command: command.as_str(),
                    status: status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string()),
                    output:
                        "its stdout stayed open after it exited (a process it started holds it)"
                            .into(),
                })
            }
        };
        let status = status.map_err(|source| InvokeError::Spawn {
            path: path.display().to_string(),
            source,
        })?;
        if status.success() {
            return Ok(out);
        }
        if let Ok(error) = serde_json::from_slice::<CniError>(&out) {
            return Err(InvokeError::Plugin {
                plugin: plugin.to_string(),
                command: command.as_str(),
                error: Box::new(error),
            });
        }
        let stderr = err_rx.recv_timeout(AFTER_KILL).unwrap_or_default();
        let mut output = String::from_utf8_lossy(&out).trim().to_string();
        let err = String::from_utf8_lossy(&stderr);
        if !err.trim().is_empty() {
            output.push_str(" stderr: ");
            output.push_str(err.trim());
        }
        truncate_utf8(&mut output, 2000);
        Err(InvokeError::Crashed {
            plugin: plugin.to_string(),
            command: command.as_str(),
            status: status.to_string(),
            output,
        })
    }
}
