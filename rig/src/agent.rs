//! The trellis agent as a process inside a namespace, stopped when dropped.

use crate::netns::Netns;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the agent logs once it serves its socket.
const READY: &str = "trellis agent ready";

pub struct AgentProcess {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts `trellis agent` in `netns` and waits for its socket.
    pub fn start(netns: &Netns, config: &Path, socket: &Path, log: &Path) -> AgentProcess {
        // The log is appended to across restarts: this start's "ready" is one more.
        let ready = |log: &Path| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .matches(READY)
                .count()
        };
        let readies = ready(log);
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("agent log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .arg(crate::bins::trellis())
            .args(["agent", "--config"])
            .arg(config)
            .env(
                "TRELLIS_LOG",
                std::env::var("TRELLIS_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf)
            .spawn()
            .expect("start agent");
        let mut a = AgentProcess {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = a.child.try_wait() {
                panic!(
                    "agent exited with {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent socket {} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The socket is bound before start-up work (sweeps, reconcile): serving starts
        // once the agent logs that it is ready.
        while ready(log) <= readies {
            if let Ok(Some(status)) = a.child.try_wait() {
                panic!(
                    "agent exited with {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "agent never logged {READY:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        a
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `timeout`) for the agent to exit on its own.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
