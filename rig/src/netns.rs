//! Network namespaces the rig makes (with `ip netns add`) and always removes.

use std::path::PathBuf;
use std::process::{Command, Output};

pub struct Netns {
    pub name: String,
    path: PathBuf,
    /// Made by the rig (removed on drop), or someone else's (a pod's, left alone).
    owned: bool,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = crate::unique(prefix);
        run("ip", &["netns", "add", &name]);
        let ns = Netns {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
            owned: true,
        };
        ns.sh("ip link set lo up");
        ns
    }

    /// A namespace made by someone else (for example a pod's, made by containerd).
    pub fn at(path: impl Into<PathBuf>) -> Netns {
        let path = path.into();
        Netns {
            name: path.display().to_string(),
            path,
            owned: false,
        }
    }

    /// Moves the calling thread into this namespace for good (a thread of its own, or
    /// a bench's main thread whose children should start there).
    pub fn enter_this_thread(&self) {
        let f = std::fs::File::open(&self.path).expect("open netns");
        // SAFETY: setns(2) on a valid fd; affects only the calling thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {}: {}",
            self.path.display(),
            std::io::Error::last_os_error()
        );
    }

    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// A command run inside the namespace (nsenter keeps /sys and bpffs as they are).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg(program);
        c
    }

    /// Runs a shell line in the namespace and returns its output; panics on failure.
    pub fn sh(&self, line: &str) -> String {
        let out = self.try_sh(line);
        assert!(
            out.status.success(),
            "in netns {}: `{line}` failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_sh(&self, line: &str) -> Output {
        self.command("sh")
            .args(["-c", line])
            .output()
            .expect("nsenter")
    }

    /// Interface names in the namespace (without lo).
    pub fn links(&self) -> Vec<String> {
        let out = self.sh("ip -o link show");
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n != "lo")
            .collect()
    }

    /// IPv4 addresses (CIDR) on an interface.
    pub fn addrs(&self, ifname: &str) -> Vec<String> {
        let out = self.sh(&format!("ip -o -4 addr show dev {ifname}"));
        out.lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
            .map(str::to_string)
            .collect()
    }

    pub fn ping(&self, addr: &str) -> bool {
        self.try_sh(&format!("ping -c 2 -i 0.2 -W 2 {addr}"))
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
