//! Running CNI plugins: one binary with a timeout, and a whole conflist the way libcni
//! chains it (prevResult forwarding on ADD, reverse order on DEL, CHECK, GC, STATUS).

use crate::conf::NetConfList;
use crate::env::Command as CniCommand;
use crate::error::CniError;
use crate::result::{CniResult, ResultError};
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

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
                crate::ErrorCode::InvalidNetworkConfig as u32
            }
            _ => crate::ErrorCode::Io as u32,
        };
        CniError {
            cni_version: crate::version::CURRENT.to_string(),
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
        crate::conf::check_plugin_name(plugin).map_err(|reason| InvokeError::BadName {
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

    /// ADD through the whole list; returns the last plugin's result (in the list's
    /// version), or the error with how many plugins need a DEL: those before the
    /// failing one, and the failing one too unless it reported its error (see
    /// `InvokeError::needs_del`).
    pub fn add_list(
        &self,
        list: &NetConfList,
        target: &Target,
        runtime_config: &Map<String, Value>,
    ) -> Result<Value, (usize, InvokeError)> {
        let mut prev: Option<Value> = None;
        for i in 0..list.plugins.len() {
            let plugin = list.plugin_type(i);
            let stdin = list.plugin_stdin(i, runtime_config, prev.as_ref());
            let out = self
                .exec(
                    plugin,
                    CniCommand::Add,
                    target,
                    stdin.to_string().as_bytes(),
                )
                .map_err(|e| (i + usize::from(e.needs_del()), e))?;
            // Exit 0 with a bad result: the plugin did its work, so it needs a DEL too.
            let bad = |source| {
                (
                    i + 1,
                    InvokeError::BadResult {
                        plugin: plugin.to_string(),
                        source,
                    },
                )
            };
            let value: Value = serde_json::from_slice(&out).map_err(|e| {
                bad(ResultError::Field {
                    field: "(document)".into(),
                    reason: e.to_string(),
                })
            })?;
            CniResult::from_value(&value).map_err(bad)?;
            prev = Some(value);
        }
        Ok(prev.unwrap_or_else(|| json!({"cniVersion": list.cni_version})))
    }

    /// DEL through the list in reverse. Every plugin is asked even when one fails; all
    /// failures are returned.
    pub fn del_list(
        &self,
        list: &NetConfList,
        target: &Target,
        runtime_config: &Map<String, Value>,
        cached: Option<&Value>,
    ) -> Vec<InvokeError> {
        let prev = cached.filter(|_| list.version().del_gets_prev_result());
        let mut errors = Vec::new();
        for i in (0..list.plugins.len()).rev() {
            let stdin = list.plugin_stdin(i, runtime_config, prev);
            if let Err(e) = self.exec(
                list.plugin_type(i),
                CniCommand::Del,
                target,
                stdin.to_string().as_bytes(),
            ) {
                errors.push(e);
            }
        }
        errors
    }

    /// CHECK through the list with the cached result; skipped for versions before
    /// 0.4.0 and for lists with disableCheck.
    pub fn check_list(
        &self,
        list: &NetConfList,
        target: &Target,
        runtime_config: &Map<String, Value>,
        cached: &Value,
    ) -> Result<(), InvokeError> {
        if list.disable_check || !list.version().supports_check() {
            return Ok(());
        }
        for i in 0..list.plugins.len() {
            let stdin = list.plugin_stdin(i, runtime_config, Some(cached));
            self.exec(
                list.plugin_type(i),
                CniCommand::Check,
                target,
                stdin.to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    /// GC with the attachments still valid, as (container ID, ifname) pairs; skipped
    /// for versions before 1.1.0 and for lists with disableGC.
    pub fn gc_list(&self, list: &NetConfList, valid: &[(String, String)]) -> Vec<InvokeError> {
        if list.disable_gc || !list.version().supports_status_gc() {
            return Vec::new();
        }
        let attachments: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        let mut errors = Vec::new();
        for i in 0..list.plugins.len() {
            let mut stdin = list.plugin_stdin(i, &Map::new(), None);
            stdin["cni.dev/valid-attachments"] = Value::Array(attachments.clone());
            if let Err(e) = self.exec(
                list.plugin_type(i),
                CniCommand::Gc,
                &Target::default(),
                stdin.to_string().as_bytes(),
            ) {
                errors.push(e);
            }
        }
        errors
    }

    /// STATUS: for 1.1.0 lists each plugin is asked; for older ones it is enough
    /// that every plugin binary is present.
    pub fn status_list(&self, list: &NetConfList) -> Result<(), InvokeError> {
        for i in 0..list.plugins.len() {
            let plugin = list.plugin_type(i);
            if list.version().supports_status_gc() {
                let stdin = list.plugin_stdin(i, &Map::new(), None);
                self.exec(
                    plugin,
                    CniCommand::Status,
                    &Target::default(),
                    stdin.to_string().as_bytes(),
                )?;
            } else {
                self.find(plugin)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &std::path::Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn invoker(dir: &std::path::Path, timeout_ms: u64) -> Invoker {
        Invoker {
            bin_dirs: vec![PathBuf::from("/nonexistent"), dir.to_path_buf()],
            timeout: Duration::from_millis(timeout_ms),
            in_process: None,
            host_process: None,
        }
    }

    #[test]
    fn chains_prev_result_and_env() {
        let d = tempfile::tempdir().unwrap();
        // First plugin echoes a result; second proves it saw prevResult and the env.
        script(
            d.path(),
            "one",
            r#"cat >/dev/null; echo '{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]}'"#,
        );
        script(
            d.path(),
            "two",
            r#"in=$(cat); case "$in" in *prevResult*10.0.0.2*) ;; *) echo '{"code":7,"msg":"no prev"}'; exit 1;; esac
               echo "{\"cniVersion\":\"1.0.0\",\"interfaces\":[{\"name\":\"$CNI_IFNAME\",\"sandbox\":\"$CNI_NETNS\"}]}""#,
        );
        let list = NetConfList::parse(
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"one"},{"type":"two"}]}"#,
            None,
        )
        .unwrap();
        let t = Target {
            container_id: "c1",
            netns: "/run/netns/p",
            ifname: "net1",
            args: "",
        };
        let r = invoker(d.path(), 5000)
            .add_list(&list, &t, &Map::new())
            .unwrap();
        assert_eq!(r["interfaces"][0]["name"], "net1");
        assert_eq!(r["interfaces"][0]["sandbox"], "/run/netns/p");
    }

    #[test]
    fn plugin_error_json_is_kept() {
        let d = tempfile::tempdir().unwrap();
        script(
            d.path(),
            "bad",
            r#"echo '{"cniVersion":"1.0.0","code":7,"msg":"bridge name too long"}'; exit 1"#,
        );
        let e = invoker(d.path(), 5000)
            .exec("bad", CniCommand::Add, &Target::default(), b"{}")
            .unwrap_err();
        let c = e.to_cni_error("network a");
        assert_eq!(c.code, 7);
        assert!(c.msg.contains("bridge name too long"), "{c}");
    }

    #[test]
    fn crash_without_json_reports_stderr() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "crash", "echo boom >&2; exit 3");
        let e = invoker(d.path(), 5000)
            .exec("crash", CniCommand::Add, &Target::default(), b"{}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("boom") && e.contains("exit status: 3"), "{e}");
    }

    #[test]
    fn timeout_kills_the_process_group() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("child.pid");
        script(
            d.path(),
            "slow",
            &format!("sleep 30 & echo $! > {}; wait", marker.display()),
        );
        let start = std::time::Instant::now();
        let e = invoker(d.path(), 300)
            .exec("slow", CniCommand::Add, &Target::default(), b"{}")
            .unwrap_err();
        assert!(matches!(e, InvokeError::Timeout { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild was killed with the group (it may linger as a zombie briefly).
        std::thread::sleep(Duration::from_millis(100));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "sleep still running: {stat}"
        );
    }

    /// The plugin of an agent that dies mid-call dies too (PR_SET_PDEATHSIG): this
    /// test runs itself as the "agent", in a process of its own, and SIGKILLs it.
    #[test]
    fn a_plugin_dies_with_the_agent() {
        if let Ok(dir) = std::env::var("TRELLIS_TEST_AGENT_DIR") {
            // The "agent": blocks in a plugin that sleeps, until it is killed.
            let d = std::path::PathBuf::from(dir);
            let _ = invoker(&d, 60_000).exec("slow", CniCommand::Add, &Target::default(), b"{}");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("plugin.pid");
        script(
            d.path(),
            "slow",
            &format!("echo $$ > {}; exec sleep 30", marker.display()),
        );
        /// The "agent" killed even when an assert below fails.
        struct Killed(std::process::Child);
        impl Drop for Killed {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut agent = Killed(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "invoke::tests::a_plugin_dies_with_the_agent"])
                .env("TRELLIS_TEST_AGENT_DIR", d.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let pid: i32 = loop {
            if let Some(p) = std::fs::read_to_string(&marker)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            assert!(std::time::Instant::now() < deadline, "the plugin never ran");
            std::thread::sleep(Duration::from_millis(20));
        };
        agent.0.kill().unwrap();
        agent.0.wait().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the plugin outlived its agent: {stat}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn names_that_are_paths_never_run() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("ran");
        script(d.path(), "x.sh", &format!("touch {}", marker.display()));
        let abs = d.path().join("x.sh").display().to_string();
        let dotdot = format!(
            "../{}/x.sh",
            d.path().file_name().unwrap().to_string_lossy()
        );
        for name in [abs.as_str(), dotdot.as_str(), "", ".", "..", "a\0b"] {
            let e = invoker(d.path(), 1000)
                .exec(name, CniCommand::Add, &Target::default(), b"{}")
                .unwrap_err();
            assert!(matches!(e, InvokeError::BadName { .. }), "{name:?}: {e}");
            assert_eq!(e.to_cni_error("x").code, 7);
            assert!(!e.needs_del());
        }
        assert!(!marker.exists(), "a path was exec'd");
    }

    #[test]
    fn multibyte_output_is_cut_on_a_char_boundary() {
        let d = tempfile::tempdir().unwrap();
        script(
            d.path(),
            "utf8",
            &format!("printf '{}\\303\\251'; exit 3", "a".repeat(1999)),
        );
        let e = invoker(d.path(), 5000)
            .exec("utf8", CniCommand::Add, &Target::default(), b"{}")
            .unwrap_err();
        assert!(matches!(e, InvokeError::Crashed { .. }), "{e}");
    }

    #[test]
    fn a_plugin_that_ran_is_counted_for_del() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "crash", "cat >/dev/null; exit 3");
        script(d.path(), "slow", "sleep 30");
        script(
            d.path(),
            "fails",
            r#"cat >/dev/null; echo '{"code":7,"msg":"no"}'; exit 1"#,
        );
        let t = Target::default();
        for (ty, done) in [("crash", 1), ("slow", 1), ("fails", 0), ("missing", 0)] {
            let list = NetConfList::parse(
                format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"{ty}"}}"#).as_bytes(),
                None,
            )
            .unwrap();
            let (n, e) = invoker(d.path(), 300)
                .add_list(&list, &t, &Map::new())
                .unwrap_err();
            assert_eq!(n, done, "{ty}: {e}");
        }
    }

    #[test]
    fn a_hung_grandchild_holding_the_pipes_does_not_hang_the_call() {
        let d = tempfile::tempdir().unwrap();
        // setsid: the grandchild leaves the plugin's process group, so the kill
        // misses it, and it keeps stdout and stderr open.
        script(d.path(), "escape", "setsid sleep 20 & sleep 30");
        let start = std::time::Instant::now();
        let e = invoker(d.path(), 300)
            .exec("escape", CniCommand::Add, &Target::default(), b"{}")
            .unwrap_err();
        assert!(matches!(e, InvokeError::Timeout { .. }), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn missing_plugin_names_dirs() {
        let d = tempfile::tempdir().unwrap();
        let e = invoker(d.path(), 100).find("nope").unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("/nonexistent"), "{e}");
    }

    #[test]
    fn del_asks_every_plugin_in_reverse() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        for name in ["a", "b", "c"] {
            script(
                d.path(),
                name,
                &format!("cat >/dev/null; echo {name} >> {}; [ {name} = b ] && {{ echo '{{\"code\":5,\"msg\":\"b\"}}'; exit 1; }}; exit 0", log.display()),
            );
        }
        let list = NetConfList::parse(
            br#"{"cniVersion":"0.4.0","name":"n","plugins":[{"type":"a"},{"type":"b"},{"type":"c"}]}"#,
            None,
        )
        .unwrap();
        let errs = invoker(d.path(), 5000).del_list(&list, &Target::default(), &Map::new(), None);
        assert_eq!(errs.len(), 1);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "c\nb\na\n");
    }
}
