//! Fixture sysfs trees, laid out as the kernel lays out /sys (device directories
//! under `devices/`, `bus/pci/devices/<addr>` symlinks to them, `driver`,
//! `iommu_group`, `physfn` and `virtfnN` as relative symlinks), for tests and
//! benchmarks of discovery on machines without SR-IOV hardware.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

pub struct FixtureSysfs {
    dir: tempfile::TempDir,
    next_group: AtomicU32,
}

/// An SR-IOV PF to lay out, with `vfs` VFs enabled.
#[derive(Debug, Clone)]
pub struct Pf<'a> {
    pub address: &'a str,
    pub vendor: u16,
    pub device: u16,
    pub vf_device: u16,
    pub driver: &'a str,
    /// `None`: VFs are left unbound.
    pub vf_driver: Option<&'a str>,
    pub netdev: &'a str,
    /// -1: no NUMA affinity, as the kernel writes it.
    pub numa: i32,
    pub total_vfs: u32,
    pub vfs: u32,
    /// ARPHRD number of the netdevs (1 = Ethernet, 32 = InfiniBand).
    pub arphrd: u32,
}

impl Pf<'static> {
    /// QEMU's emulated Intel 82576: PF 8086:10c9 (igb), VFs 8086:10ca (igbvf).
    pub fn igb() -> Pf<'static> {
        Pf {
            address: "0000:01:00.0",
            vendor: 0x8086,
            device: 0x10c9,
            vf_device: 0x10ca,
            driver: "igb",
            vf_driver: Some("igbvf"),
            netdev: "enp1s0",
            numa: 0,
            total_vfs: 7,
            vfs: 0,
            arphrd: 1,
        }
    }
}

/// The address of VF `index` of a PF at function 0: 82576-style, device 0x10 up,
/// stride 2.
pub fn vf_address(pf: &str, index: u32) -> String {
    let (bus, _) = pf.rsplit_once(':').expect("PF address");
    let n = 2 * index;
    format!("{bus}:{:02x}.{:x}", 0x10 + n / 8, n % 8)
}

fn write(p: &Path, content: &str) {
    std::fs::write(p, format!("{content}\n")).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
}

impl FixtureSysfs {
    pub fn new() -> FixtureSysfs {
        let dir = tempfile::Builder::new()
            .prefix("trellis-sysfs")
            .tempdir()
            .expect("tempdir");
        for d in [
            "devices/pci0000:00",
            "bus/pci/devices",
            "bus/pci/drivers",
            "kernel/iommu_groups",
        ] {
            std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        FixtureSysfs {
            dir,
            next_group: AtomicU32::new(1),
        }
    }

    /// Where /sys would be.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    fn dev_dir(&self, addr: &str) -> PathBuf {
        self.root().join("devices/pci0000:00").join(addr)
    }

    fn add_device(&self, addr: &str, vendor: u16, device: u16, class: u32, numa: i32) -> PathBuf {
        let d = self.dev_dir(addr);
        std::fs::create_dir_all(&d).expect("mkdir device");
        write(&d.join("vendor"), &format!("0x{vendor:04x}"));
        write(&d.join("device"), &format!("0x{device:04x}"));
        write(&d.join("class"), &format!("0x{class:06x}"));
        write(&d.join("numa_node"), &numa.to_string());
        let g = self.next_group.fetch_add(1, Ordering::Relaxed);
        std::fs::create_dir_all(self.root().join(format!("kernel/iommu_groups/{g}"))).unwrap();
        symlink(
            format!("../../../kernel/iommu_groups/{g}"),
            d.join("iommu_group"),
        )
        .unwrap();
        symlink(
            format!("../../../devices/pci0000:00/{addr}"),
            self.root().join("bus/pci/devices").join(addr),
        )
        .unwrap();
        d
    }

    fn add_netdev(&self, addr: &str, name: &str, arphrd: u32) {
        let n = self.dev_dir(addr).join("net").join(name);
        std::fs::create_dir_all(&n).unwrap();
        write(&n.join("type"), &arphrd.to_string());
    }

    /// Binds `driver` (replacing any); a netdev driver gets a netdev named after the
    /// device, vfio-pci none.
    pub fn bind(&self, addr: &str, driver: &str) {
        self.unbind(addr);
        std::fs::create_dir_all(self.root().join("bus/pci/drivers").join(driver)).unwrap();
        let d = self.dev_dir(addr);
        symlink(
            format!("../../../bus/pci/drivers/{driver}"),
            d.join("driver"),
        )
        .unwrap();
        if driver != crate::sysfs::VFIO_DRIVER {
            let name = format!("vf{}", addr.replace([':', '.'], ""));
            self.add_netdev(addr, &name[..name.len().min(15)], 1);
        }
    }

    /// The driver stays bound, its netdevs go.
    pub fn remove_netdevs(&self, addr: &str) {
        let _ = std::fs::remove_dir_all(self.dev_dir(addr).join("net"));
    }

    /// No driver, no netdev.
    pub fn unbind(&self, addr: &str) {
        let d = self.dev_dir(addr);
        let _ = std::fs::remove_file(d.join("driver"));
        let _ = std::fs::remove_dir_all(d.join("net"));
    }

    pub fn add_pf(&self, pf: &Pf) {
        let d = self.add_device(pf.address, pf.vendor, pf.device, 0x020000, pf.numa);
        write(&d.join("sriov_totalvfs"), &pf.total_vfs.to_string());
        write(&d.join("sriov_numvfs"), "0");
        std::fs::create_dir_all(self.root().join("bus/pci/drivers").join(pf.driver)).unwrap();
        symlink(
            format!("../../../bus/pci/drivers/{}", pf.driver),
            d.join("driver"),
        )
        .unwrap();
        self.add_netdev(pf.address, pf.netdev, pf.arphrd);
        self.set_num_vfs(pf, pf.vfs);
    }

    /// What writing `sriov_numvfs` does: VFs 0..n exist, the rest are gone.
    pub fn set_num_vfs(&self, pf: &Pf, n: u32) {
        let d = self.dev_dir(pf.address);
        let old: u32 = std::fs::read_to_string(d.join("sriov_numvfs"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        for i in n..old {
            let vf = vf_address(pf.address, i);
            let _ = std::fs::remove_file(d.join(format!("virtfn{i}")));
            let _ = std::fs::remove_file(self.root().join("bus/pci/devices").join(&vf));
            let _ = std::fs::remove_dir_all(self.dev_dir(&vf));
        }
        for i in old..n {
            let vf = vf_address(pf.address, i);
            let vd = self.add_device(&vf, pf.vendor, pf.vf_device, 0x020000, pf.numa);
            symlink(format!("../{}", pf.address), vd.join("physfn")).unwrap();
            symlink(format!("../{vf}"), d.join(format!("virtfn{i}"))).unwrap();
            if let Some(drv) = pf.vf_driver {
                std::fs::create_dir_all(self.root().join("bus/pci/drivers").join(drv)).unwrap();
                symlink(format!("../../../bus/pci/drivers/{drv}"), vd.join("driver")).unwrap();
                self.add_netdev(&vf, &format!("{}v{i}", pf.netdev), pf.arphrd);
            }
        }
        write(&d.join("sriov_numvfs"), &n.to_string());
    }

    /// A network function with no SR-IOV (no PF, no VFs) whose netdev is `netdev`:
    /// with a real link of that name (a veth), it stands in for a VF in tests.
    pub fn add_netdev_device(&self, addr: &str, netdev: &str, numa: i32) {
        self.add_device(addr, 0x8086, 0x10ca, 0x020000, numa);
        std::fs::create_dir_all(self.root().join("bus/pci/drivers/veth")).unwrap();
        symlink(
            "../../../bus/pci/drivers/veth",
            self.dev_dir(addr).join("driver"),
        )
        .unwrap();
        self.add_netdev(addr, netdev, 1);
    }

    /// A VF whose netdev is `netdev`, of a stand-in PF (`<bus>:00.0`, made on first
    /// use, with no netdev, so no PF-side VF settings): with a real link of that name
    /// (a veth), it stands in for a VF in tests.
    pub fn add_standin_vf(&self, vf_addr: &str, netdev: &str) {
        let (bus, _) = vf_addr.rsplit_once(':').expect("PCI address");
        let pf = format!("{bus}:00.0");
        let pd = self.dev_dir(&pf);
        if !pd.exists() {
            let d = self.add_device(&pf, 0x8086, 0x10c9, 0x020000, 0);
            write(&d.join("sriov_totalvfs"), "64");
            std::fs::create_dir_all(self.root().join("bus/pci/drivers/standin-pf")).unwrap();
            symlink("../../../bus/pci/drivers/standin-pf", d.join("driver")).unwrap();
        }
        // The first free VF index (one removed by `remove_standin_vf` leaves a gap).
        let n = (0..)
            .find(|i| std::fs::symlink_metadata(pd.join(format!("virtfn{i}"))).is_err())
            .expect("a free VF index");
        let vd = self.add_device(vf_addr, 0x8086, 0x10ca, 0x020000, 0);
        symlink(format!("../{pf}"), vd.join("physfn")).unwrap();
        symlink(format!("../{vf_addr}"), pd.join(format!("virtfn{n}"))).unwrap();
        std::fs::create_dir_all(self.root().join("bus/pci/drivers/veth")).unwrap();
        symlink("../../../bus/pci/drivers/veth", vd.join("driver")).unwrap();
        self.add_netdev(vf_addr, netdev, 1);
        write(&pd.join("sriov_numvfs"), &self.standin_vfs(&pd).to_string());
    }

    /// A stand-in VF (of `add_standin_vf`) gone from the tree, as a VF hot-unplugged
    /// or lost to a lowered `sriov_numvfs`: its device, bus link and `virtfnN` go.
    pub fn remove_standin_vf(&self, vf_addr: &str) {
        let (bus, _) = vf_addr.rsplit_once(':').expect("PCI address");
        let pd = self.dev_dir(&format!("{bus}:00.0"));
        for e in std::fs::read_dir(&pd).into_iter().flatten().flatten() {
            let is_it = e.file_name().to_string_lossy().starts_with("virtfn")
                && std::fs::read_link(e.path())
                    .is_ok_and(|t| t.file_name().is_some_and(|n| n == vf_addr));
            if is_it {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_file(self.root().join("bus/pci/devices").join(vf_addr));
        let _ = std::fs::remove_dir_all(self.dev_dir(vf_addr));
        write(&pd.join("sriov_numvfs"), &self.standin_vfs(&pd).to_string());
    }

    fn standin_vfs(&self, pf_dir: &Path) -> usize {
        std::fs::read_dir(pf_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("virtfn"))
            .count()
    }

    /// A device of another class (storage, display, ...), which discovery skips.
    pub fn add_other(&self, addr: &str, class: u32) {
        self.add_device(addr, 0x8086, 0x2922, class, -1);
    }
}

impl Default for FixtureSysfs {
    fn default() -> Self {
        Self::new()
    }
}
