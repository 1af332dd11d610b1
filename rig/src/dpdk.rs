//! DPDK testpmd as a vhost-user switch (see ../shared/RIGS.md): `net_vhost` in server
//! mode makes the socket, as OVS-DPDK or VPP would. No hugepages, no PCI.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Testpmd {
    child: Option<Child>,
    // testpmd exits when its stdin closes: held open for its lifetime.
    _stdin: Option<ChildStdin>,
    prefix: String,
    pub log: PathBuf,
}

impl Testpmd {
    /// Starts testpmd with a vhost-user server socket at `socket`; returns once the
    /// socket is there.
    pub fn vhost_server(socket: &Path, log: &Path) -> Testpmd {
        let prefix = crate::unique("trellis");
        let logf = std::fs::File::create(log).expect("testpmd log");
        let mut child = Command::new("dpdk-testpmd")
            .args(["-l", "0,1", "--no-huge", "-m", "128", "--no-pci"])
            .arg(format!("--file-prefix={prefix}"))
            .arg("--vdev")
            .arg(format!("net_vhost0,iface={},client=0", socket.display()))
            .args([
                "--",
                "--nb-cores=1",
                "--total-num-mbufs=4096",
                "--forward-mode=rxonly",
            ])
            .stdin(Stdio::piped())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("start dpdk-testpmd (scripts/setup.sh installs dpdk-dev)");
        let stdin = child.stdin.take();
        let t = Testpmd {
            child: Some(child),
            _stdin: stdin,
            prefix,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "testpmd made no socket: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    /// The pod side: testpmd with `virtio_user` on `socket`, sending (txonly) for
    /// `secs` seconds; returns its output.
    pub fn virtio_user_burst(socket: &str, secs: u32) -> String {
        let prefix = crate::unique("trellisp");
        let out = Command::new("timeout")
            .args(["-s", "INT", &secs.to_string(), "dpdk-testpmd"])
            .args(["-l", "0,1", "--no-huge", "-m", "128", "--no-pci"])
            .arg(format!("--file-prefix={prefix}"))
            .arg("--vdev")
            .arg(format!("virtio_user0,path={socket}"))
            .args([
                "--",
                "--nb-cores=1",
                "--total-num-mbufs=4096",
                "--forward-mode=txonly",
                "--stats-period=1",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run dpdk-testpmd");
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// SIGINT, as an operator stops it; waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.stop();
    }
}
