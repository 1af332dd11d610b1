//! Real containerd (CRI plugin) inside a test netns, with `trellis-cni` as the node's
//! only CNI config; everything under one temp dir and removed on drop, including the
//! runc containers, mounts and libcni's cached results.

use crate::cri::Cri;
use crate::netns::Netns;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The name of the node's conflist (libcni caches results under it).
    pub cni_name: String,
    child: Child,
    /// How it was launched, to launch it again (`restart`).
    bin: PathBuf,
    conf: PathBuf,
    setup: Option<String>,
}

impl Containerd {
    /// Starts containerd in `netns`, its CNI config pointing at the agent's socket.
    pub fn start(netns: &Netns, dir: &Path, agent_socket: &Path) -> Containerd {
        let dir = dir.to_path_buf();
        for d in [
            "root", "state", "runc", "cni-bin", "cni-conf", "logs", "image",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(crate::bins::shim(), dir.join("cni-bin/trellis-cni")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/cni/loopback", dir.join("cni-bin/loopback")).unwrap();
        let cni_name = crate::unique("trellis-e2e-");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": cni_name,
            "plugins": [{
                "type": "trellis-cni",
                "socket": agent_socket,
                "capabilities": {"io.kubernetes.cri.pod-annotations": true, "portMappings": true},
            }],
        });
        std::fs::write(
            dir.join("cni-conf/10-trellis.conflist"),
            conflist.to_string(),
        )
        .unwrap();
        let child = launch(
            netns,
            &dir,
            &dir.join("cni-bin"),
            &dir.join("cni-conf"),
            None,
        );
        let socket = dir.join("containerd.sock");
        let mut c = Containerd {
            bin: dir.join("cni-bin"),
            conf: dir.join("cni-conf"),
            setup: None,
            dir,
            socket,
            cni_name,
            child,
        };
        c.wait_and_import();
        c
    }

    fn wait_and_import(&mut self) {
        self.wait_socket();
        let c = self;
        let tar = crate::pause::build_image_tar(&c.dir.join("image"));
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&c.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&tar)
            .output()
            .expect("ctr");
        assert!(
            out.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// containerd in a node of its own: a mount namespace where /etc, /opt, /var/lib
    /// and /run are overlays of the host's (writes land under `dir`, the host's files
    /// are untouched), a bpffs of its own on /sys/fs/bpf, / shared (as systemd makes
    /// it, so hostPath mounts may propagate), and the CNI dirs at the standard paths,
    /// empty but for `loopback`. Containers it runs see a node as a DaemonSet does.
    pub fn start_node(netns: &Netns, dir: &Path) -> Containerd {
        let dir = dir.to_path_buf();
        for d in ["root", "state", "runc", "logs", "image", "overlay"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let cni_name = "trellis".to_string();
        let mut setup = String::from("set -e\n");
        for top in ["etc", "opt", "var/lib", "run"] {
            let key = top.replace('/', "-");
            let up = dir.join("overlay").join(&key);
            setup += &format!(
                "mkdir -p {up}/upper {up}/work\nmount -t overlay overlay -o lowerdir=/{top},upperdir={up}/upper,workdir={up}/work /{top}\n",
                up = up.display()
            );
        }
        setup += "mkdir -p /opt/cni/bin /etc/cni/net.d\n";
        setup += "ln -sf /usr/lib/cni/loopback /opt/cni/bin/loopback\n";
        setup += "mount -t bpf bpf /sys/fs/bpf\nmount --make-rshared /\n";
        let child = launch(
            netns,
            &dir,
            Path::new("/opt/cni/bin"),
            Path::new("/etc/cni/net.d"),
            Some(&setup),
        );
        let socket = dir.join("containerd.sock");
        let mut c = Containerd {
            bin: "/opt/cni/bin".into(),
            conf: "/etc/cni/net.d".into(),
            setup: Some(setup),
            dir,
            socket,
            cni_name,
            child,
        };
        c.wait_and_import();
        c
    }

    /// containerd killed (SIGKILL, as a crash would) and started again on the same
    /// root and state: its pods' shims and containers keep running.
    pub fn restart(&mut self, netns: &Netns) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        self.child = launch(
            netns,
            &self.dir,
            &self.bin,
            &self.conf,
            self.setup.as_deref(),
        );
        self.wait_socket();
    }

    /// What a node's power cut does to containerd: it, its shims and every container
    /// die, and its state dir (`/run` on a node) is gone with the pods' netns mounts.
    /// Its root (sandbox metadata) is kept. `restart` brings it back.
    pub fn power_off(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.kill_shims_and_containers();
        for d in ["state", "runc"] {
            let dir = self.dir.join(d);
            unmount_under(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
        }
    }

    /// The network namespaces containerd holds mounted now (one per live sandbox).
    pub fn netns_mounts(&self) -> Vec<String> {
        let prefix = self.dir.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" - nsfs "))
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }

    /// containerd's shims serving this containerd (one per live sandbox).
    pub fn shims(&self) -> Vec<u32> {
        let needle = self.socket.display().to_string();
        let mut out = Vec::new();
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                if let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() {
                    if pid != self.child.id() {
                        out.push(pid);
                    }
                }
            }
        }
        out
    }

    fn kill_shims_and_containers(&self) {
        let runc_root = self.dir.join("runc/k8s.io");
        if let Ok(out) = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["list", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
        for pid in self.shims() {
            // SAFETY: kill(2) on a pid that is one of our containerd shims.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    fn wait_socket(&mut self) {
        let c = self;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&c.socket).is_err() {
            if let Ok(Some(s)) = c.child.try_wait() {
                panic!("containerd exited with {s}: {}", c.log());
            }
            assert!(
                Instant::now() < deadline,
                "containerd socket never appeared: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// containerd's pid (its mount namespace is the node's, with `start_node`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A path of the node (`start_node`) as this process can open it.
    pub fn node_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid()))
    }

    /// Imports an OCI image archive into the CRI namespace.
    pub fn import(&self, tar: &Path) {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(tar)
            .output()
            .expect("ctr");
        assert!(
            out.status.success(),
            "ctr images import {}: {}",
            tar.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub async fn cri(&self) -> Cri {
        Cri::connect(self.socket.clone())
            .await
            .expect("CRI connect")
    }

    pub fn log_dir(&self) -> String {
        self.dir.join("logs").display().to_string()
    }

    /// Stops and removes every pod sandbox still there (on a thread of its own, so it
    /// works from inside or outside an async runtime).
    fn remove_all_pods(&self) {
        let socket = self.socket.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut cri = tokio::time::timeout(Duration::from_secs(5), Cri::connect(socket))
                    .await
                    .ok()?
                    .ok()?;
                for id in cri.list_pods().await.ok()? {
                    let _ = cri.stop_pod(&id).await;
                    let _ = cri.remove_pod(&id).await;
                }
                Some(())
            })
        })
        .join();
    }
}

/// Writes containerd's config and starts it in `netns`, after `setup` (a shell
/// script, run in a mount namespace of its own) if given.
fn launch(netns: &Netns, dir: &Path, bin: &Path, conf: &Path, setup: Option<&str>) -> Child {
    let socket = dir.join("containerd.sock");
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[{cri}]
  sandbox_image = "{image}"
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  [{cri}.cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
  [{cri}.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [{cri}.containerd.runtimes.runc.options]
      Root = "{runc}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = socket.display(),
        image = crate::pause::PAUSE_IMAGE,
        bin = bin.display(),
        conf = conf.display(),
        runc = dir.join("runc").display(),
    );
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, config).unwrap();
    // Appended to: a restarted containerd's log follows the one before.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .unwrap();
    let mut cmd = match setup {
        None => {
            let mut c = netns.command("containerd");
            c.arg("--config").arg(&cfg);
            c
        }
        // Each step execs the next: the child's pid is containerd's.
        Some(script) => {
            let mut c = netns.command("unshare");
            c.args(["--mount", "--propagation", "slave", "sh", "-c"])
                .arg(format!("{script}exec containerd --config \"$0\""))
                .arg(&cfg);
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start containerd")
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all_pods();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever survived: runc containers under our root, shims serving our socket.
        self.kill_shims_and_containers();
        unmount_under(&self.dir);
        for f in std::fs::read_dir("/var/lib/cni/results")
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.file_name().to_string_lossy().starts_with(&self.cni_name) {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

/// Lazily unmounts every mount below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let prefix = dir.display().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", p]).output();
    }
}
