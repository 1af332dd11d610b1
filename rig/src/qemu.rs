//! A QEMU guest with the emulated Intel 82576 (igb), the only real SR-IOV device
//! these machines have (see ../shared/RIGS.md): the guest kernel the setup unpacked,
//! an initramfs built per test from busybox, igb/igbvf/vfio modules, the binaries
//! under test with their libraries and a test script, run under TCG; the serial
//! console is the test's output.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where scripts/setup.sh puts the guest kernel: `vmlinux` and `modules/*.ko`.
pub const DEFAULT_GUEST_DIR: &str = "/var/cache/trellis/guest";

/// Modules in load order (dependencies first).
pub const MODULES: &[&str] = &[
    "dca",
    "i2c-algo-bit",
    "igb",
    "igbvf",
    "irqbypass",
    "vfio",
    "vfio_iommu_type1",
    "vfio-pci-core",
    "vfio-pci",
    "sch_ingress",
    "cls_bpf",
    "veth",
    "ifb",
    "sch_htb",
    "sch_fq",
];

pub struct GuestKernel {
    pub vmlinux: PathBuf,
    pub modules: PathBuf,
}

impl GuestKernel {
    /// `TRELLIS_GUEST_DIR`, else the setup's default; `None` when not set up.
    pub fn find() -> Option<GuestKernel> {
        let dir = std::env::var_os("TRELLIS_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_GUEST_DIR.into());
        let k = GuestKernel {
            vmlinux: dir.join("vmlinux"),
            modules: dir.join("modules"),
        };
        (k.vmlinux.is_file() && k.modules.is_dir()).then_some(k)
    }
}

/// The files of an initramfs, staged in a temp dir.
pub struct Initramfs {
    stage: tempfile::TempDir,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Initramfs {
    /// busybox, the modules and an /init that mounts the basics, loads the modules,
    /// runs /test.sh and powers off.
    pub fn new(kernel: &GuestKernel) -> Initramfs {
        let stage = tempfile::Builder::new()
            .prefix("trellis-initramfs")
            .tempdir()
            .expect("tempdir");
        let i = Initramfs { stage };
        for d in [
            "bin",
            "sbin",
            "proc",
            "sys",
            "dev",
            "run",
            "tmp",
            "etc",
            "lib/modules",
        ] {
            std::fs::create_dir_all(i.stage.path().join(d)).unwrap();
        }
        i.copy("/bin/busybox", "bin/busybox", 0o755);
        for m in MODULES {
            i.copy(
                kernel.modules.join(format!("{m}.ko")),
                &format!("lib/modules/{m}.ko"),
                0o644,
            );
        }
        let loads: String = MODULES
            .iter()
            .map(|m| format!("insmod /lib/modules/{m}.ko || echo \"insmod {m} failed\"\n"))
            .collect();
        i.text(
            "init",
            &format!(
                "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin:/sbin:/usr/bin\n\
                 mount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs dev /dev\n\
                 mount -t tmpfs tmpfs /run\nmount -t tmpfs tmpfs /tmp\nmount -t bpf bpf /sys/fs/bpf\n{loads}\
                 echo '=== BEGIN'\nsh /test.sh\necho \"=== RC $?\"\npoweroff -f\n"
            ),
            0o755,
        );
        i
    }

    fn copy(&self, src: impl AsRef<Path>, dest: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let d = self.stage.path().join(dest);
        std::fs::create_dir_all(d.parent().unwrap()).unwrap();
        std::fs::copy(src.as_ref(), &d)
            .unwrap_or_else(|e| panic!("{}: {e}", src.as_ref().display()));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    pub fn text(&self, dest: &str, content: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let d = self.stage.path().join(dest);
        std::fs::create_dir_all(d.parent().unwrap()).unwrap();
        std::fs::write(&d, content).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A dynamically linked program as `/bin/<name>`, stripped, with the libraries
    /// `ldd` names at their own paths.
    pub fn program(&self, src: impl AsRef<Path>, name: &str) {
        self.program_at(src, &format!("bin/{name}"));
    }

    /// The same, at `dest` (relative to the root).
    pub fn program_at(&self, src: impl AsRef<Path>, dest: &str) {
        let src = src.as_ref();
        self.copy(src, dest, 0o755);
        run(Command::new("strip").arg(self.stage.path().join(dest)));
        for line in run(Command::new("ldd").arg(src)).lines() {
            let lib = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from);
            if let Some(lib) = lib {
                let rel = lib
                    .strip_prefix("/")
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if !self.stage.path().join(&rel).exists() {
                    self.copy(&lib, &rel, 0o755);
                }
            }
        }
    }

    /// Packs the image and boots the guest with it (see [`boot`]).
    pub fn boot(&self, kernel: &GuestKernel, timeout: Duration) -> GuestRun {
        let initrd = self.stage.path().with_extension("cpio");
        self.pack(&initrd);
        let run = boot(kernel, &initrd, timeout);
        let _ = std::fs::remove_file(&initrd);
        eprintln!("guest ran for {:?}", run.took);
        run
    }

    /// An uncompressed newc cpio of the staged tree (the kernel unpacks it fastest).
    pub fn pack(&self, out: &Path) {
        let list = run(Command::new("sh")
            .arg("-c")
            .arg("find . | sort")
            .current_dir(self.stage.path()));
        let f = std::fs::File::create(out).unwrap();
        let mut child = Command::new("busybox")
            .args(["cpio", "-o", "-H", "newc"])
            .current_dir(self.stage.path())
            .stdin(Stdio::piped())
            .stdout(f)
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox cpio");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(list.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "cpio failed");
    }
}

/// What the guest printed between `=== BEGIN` and the end, and its script's status.
pub struct GuestRun {
    pub console: String,
    pub took: Duration,
}

impl GuestRun {
    /// The text between `=== <name>` and the next `=== ` line.
    pub fn section(&self, name: &str) -> Option<String> {
        let start = format!("=== {name}\n");
        let s = self.console.replace('\r', "");
        let from = s.find(&start)? + start.len();
        let rest = &s[from..];
        let end = if rest.starts_with("=== ") {
            0
        } else {
            rest.find("\n=== ").map(|e| e + 1).unwrap_or(rest.len())
        };
        Some(rest[..end].to_string())
    }

    pub fn script_status(&self) -> Option<i32> {
        let s = self.console.replace('\r', "");
        let i = s.rfind("=== RC ")?;
        s[i + 7..].split_whitespace().next()?.parse().ok()
    }
}

/// Boots the guest with one igb NIC (and a virtual IOMMU, for vfio), under TCG.
pub fn boot(kernel: &GuestKernel, initrd: &Path, timeout: Duration) -> GuestRun {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "q35,kernel-irqchip=split",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "1",
        ])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .args(["-device", "intel-iommu,intremap=off"])
        .arg("-kernel")
        .arg(&kernel.vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet cryptomgr.notests intel_iommu=on rdinit=/init",
        ])
        .args(["-device", "pcie-root-port,id=rp1,chassis=1"])
        .args([
            "-netdev",
            "hubport,id=n0,hubid=0",
            "-device",
            "igb,bus=rp1,netdev=n0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "guest did not finish within {timeout:?}: {}",
                reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    GuestRun {
        console: reader.join().unwrap_or_default(),
        took: started.elapsed(),
    }
}
