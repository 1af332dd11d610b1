//! The `sriov` network type, run in-process: a VF (by PCI address) put into the pod.
//! A netdev VF is moved into the pod's netns, renamed, given its MTU and MAC, brought
//! up and addressed through the IPAM delegate; a vfio-pci VF (DPDK) stays where it
//! is. PF-side settings (MAC, VLAN, spoofchk, trust, link state, rate) go through the
//! PF. Everything the ADD changes is saved first (state dir `vfs/<pci>.json`) and put
//! back by DEL, also after an agent restart or when the pod netns is gone.

pub mod conf;

use crate::link::{format_mac, LinkChange, Netlink, VfSettings};
use conf::SriovConf;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use trellis_cni::result::{Interface, IpConfig};
use trellis_cni::{CniError, CniResult, Command, ErrorCode};
use trellis_delegate::{InProcessPlugins, InvokeError, Invoker, Target};
use trellis_devices::pci::PciAddress;
use trellis_devices::sysfs::{PciNetDevice, Sysfs, VFIO_DRIVER};
use trellis_devices::VfClaims;

pub const TYPE: &str = "sriov";

/// What a VF was before a pod took it, and where it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VfRecord {
    pub device: String,
    pub container_id: String,
    pub netns: String,
    /// Its name in the pod.
    pub ifname: String,
    /// Netdev VFs: its name, MAC, MTU and state in the host. `None` for vfio.
    pub host: Option<crate::link::LinkState>,
    /// VFs: the PF's netdev, the VF index, and the PF-side settings before.
    pub pf: Option<PfSide>,
    /// Whether IPAM ran (its DEL is owed).
    pub ipam: bool,
    /// The kernel boot this was saved in (/proc/sys/kernel/random/boot_id): after a
    /// reboot the VF is back in the host with the PF's settings reset.
    #[serde(default)]
    pub boot_id: String,
}

/// This boot's id, read once: "" if it cannot be read (then no VF state is taken for
/// an earlier boot's).
fn boot_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PfSide {
    pub pf_netdev: String,
    pub vf: u32,
    pub before: VfSettings,
    /// What ADD set, each recorded once the PF took it (only these are put back: a
    /// driver may refuse the others, e.g. igb has no link_state).
    #[serde(default)]
    pub changed: VfSettings,
    /// A setting being applied when this was saved (the agent may have died before
    /// it knew whether the PF took it).
    #[serde(default, skip_serializing_if = "VfSettings::is_empty")]
    pub pending: VfSettings,
}

#[derive(Debug)]
pub struct SriovPlugin {
    sysfs: Sysfs,
    /// Each VF's saved host-side state, its claim (`trellis_devices::claims`).
    claims: VfClaims,
    ipam: Invoker,
    busy: Mutex<HashSet<String>>,
    freed: Condvar,
}

struct VfGuard<'a> {
    plugin: &'a SriovPlugin,
    device: String,
}

impl Drop for VfGuard<'_> {
    fn drop(&mut self) {
        self.plugin
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.device);
        self.plugin.freed.notify_all();
    }
}

/// How an ADD ended that did not fail cleanly.
enum AddOutcome {
    Done(Value),
    /// It failed and could not put everything back: its state is kept for a DEL.
    Unfinished(CniError),
}

fn conf_err(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidNetworkConfig, msg)
}

fn io_err(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::Io, msg)
}

/// The agent's own network namespace, to move links back into.
const HOST_NETNS: &str = "/proc/self/ns/net";

/// A name for the VF netdev while it moves: unique per device, at most 15 bytes.
fn temp_name(device: &str) -> String {
    let digits: String = device.chars().filter(char::is_ascii_hexdigit).collect();
    format!("tv{}", &digits[digits.len().saturating_sub(12)..])
}

impl SriovPlugin {
    pub fn new(sysfs_root: &Path, state_dir: &Path, ipam: Invoker) -> std::io::Result<SriovPlugin> {
        let claims = VfClaims::under(state_dir);
        crate::records::private_dir(claims.dir())?;
        Ok(SriovPlugin {
            sysfs: Sysfs::new(sysfs_root),
            claims,
            ipam: Invoker {
                in_process: None,
                ..ipam
            },
            busy: Mutex::new(HashSet::new()),
            freed: Condvar::new(),
        })
    }

    /// VF state files no container record points to (their ADD failed and its undo
    /// too, then the record went; or records were lost): each VF is put back as far
    /// as it can be and its file removed, so the VF is not held for ever. For agent
    /// start-up, before any request.
    pub fn sweep(&self, records: &crate::records::RecordStore) -> Vec<String> {
        self.sweep_locked(records, |_| Some(()))
    }

    /// `sweep` while requests run: `lock` takes the owning container's lock if no
    /// request holds it (None: the VF is left for the next sweep), and each VF's file
    /// is read again under the VF's own lock, so a VF an ADD or DEL is working on, or
    /// that changed hands since the dir was read, is never touched.
    pub fn sweep_locked<G>(
        &self,
        records: &crate::records::RecordStore,
        lock: impl Fn(&str) -> Option<G>,
    ) -> Vec<String> {
        let mut swept = Vec::new();
        for device in self.claims.claimed() {
            let device = device.as_str();
            // Who held it when the dir was read: that container's requests stay out
            // while it is looked at (then the VF's own lock, as ADD and DEL take them).
            let holder = match self.record(device) {
                Ok(Some(r)) => Some(r.container_id),
                _ => None,
            };
            let _container = match holder.as_deref().map(&lock) {
                Some(None) => continue,
                Some(Some(g)) => Some(g),
                None => None,
            };
            let _vf = self.lock(device);
            let r = match self.record(device) {
                // Changed hands since: the next sweep looks again.
                Ok(Some(r)) if Some(&r.container_id) != holder.as_ref() => continue,
                Ok(Some(r)) => r,
                Ok(None) => continue,
                // Set aside only when it was read and is not a VF record; an error
                // reading it (out of fds, I/O) may hide a live pod's state.
                Err(err) if std::fs::read(self.record_path(device)).is_ok() => {
                    let aside = self.claims.dir().join(format!(".{device}.json.corrupt"));
                    tracing::warn!(%device, "{}; set aside as {}", err.msg, aside.display());
                    let _ = std::fs::rename(self.record_path(device), &aside);
                    swept.push(device.to_string());
                    continue;
                }
                Err(err) => {
                    tracing::warn!(%device, "{}; kept", err.msg);
                    continue;
                }
            };
            // Left alone when in doubt: a record that cannot be read may own it.
            let owner = match records.load(&r.container_id) {
                Ok(owner) => owner,
                Err(e) => {
                    tracing::warn!(%device, "VF state kept: its owner's record: {e}");
                    continue;
                }
            };
            let addr: Option<PciAddress> = device.parse().ok();
            let owned = owner.is_some_and(|c| {
                c.attachments.iter().any(|a| {
                    a.device
                        .as_deref()
                        .and_then(|d| d.parse::<PciAddress>().ok())
                        == addr
                })
            });
            // From an earlier boot, the VF is back in the host and its PF settings are
            // reset: nothing holds it any more (the attachment's DEL still runs IPAM's).
            let now = boot_id();
            let earlier_boot = !r.boot_id.is_empty() && !now.is_empty() && r.boot_id != now;
            if owned && !earlier_boot {
                continue;
            }
            let target = Target {
                container_id: &r.container_id,
                netns: &r.netns,
                ifname: &r.ifname,
                args: "",
            };
            let why = if earlier_boot {
                "VF state from an earlier boot"
            } else {
                "VF held by no attachment record"
            };
            let failed = self.restore(&r, &target);
            if failed.is_empty() {
                tracing::info!(%device, container = %r.container_id, "{why}: put back and released");
            } else {
                tracing::warn!(%device, container = %r.container_id, "{why}: released, but could not put back: {}", failed.join("; "));
            }
            let _ = std::fs::remove_file(self.record_path(device));
            swept.push(device.to_string());
        }
        swept
    }

    /// Only one ADD or DEL works on a VF at a time.
    fn lock(&self, device: &str) -> VfGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.contains(device) {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        busy.insert(device.to_string());
        VfGuard {
            plugin: self,
            device: device.to_string(),
        }
    }

    fn record_path(&self, device: &str) -> PathBuf {
        self.claims.path(device)
    }

    pub fn record(&self, device: &str) -> Result<Option<VfRecord>, CniError> {
        let p = self.record_path(device);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| io_err(format!("VF record {} is corrupt: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("VF record {}: {e}", p.display()))),
        }
    }

    fn save(&self, r: &VfRecord) -> Result<(), CniError> {
        let p = self.record_path(&r.device);
        // On disk before the change it describes is made.
        crate::records::write_atomic(&p, &serde_json::to_vec(r).expect("record serialises"))
            .map_err(|e| io_err(format!("cannot save VF record {}: {e}", p.display())))
    }

    fn device(&self, c: &SriovConf) -> Result<(PciAddress, PciNetDevice), CniError> {
        let addr = c.device_id.ok_or_else(|| {
            conf_err("deviceID: missing (give the NAD a k8s.v1.cni.cncf.io/resourceName annotation, or deviceID in its config)")
        })?;
        let d = self
            .sysfs
            .device(addr)
            .ok_or_else(|| conf_err(format!("deviceID: no PCI device {addr}")))?;
        Ok((addr, d))
    }

    fn ipam_call(
        &self,
        c: &SriovConf,
        cmd: Command,
        target: &Target,
    ) -> Result<Option<CniResult>, CniError> {
        crate::kinds::ipam(&self.ipam, &c.raw, cmd, target)
    }

    fn add(&self, target: &Target, c: &SriovConf) -> Result<AddOutcome, CniError> {
        let (addr, dev) = self.device(c)?;
        let device = addr.to_string();
        let _guard = self.lock(&device);
        if let Some(r) = self.record(&device)? {
            return Err(conf_err(format!(
                "deviceID: {device} is already in use by container {} ({} in {})",
                r.container_id, r.ifname, r.netns
            )));
        }
        let vfio = match dev.driver.as_deref() {
            None => return Err(conf_err(format!("deviceID: {device} has no driver bound"))),
            Some(VFIO_DRIVER) => true,
            Some(_) => false,
        };
        if vfio && c.mtu.is_some() {
            return Err(conf_err(format!(
                "mtu: {device} is bound to vfio-pci (DPDK) and has no netdev to configure"
            )));
        }
        let host_name = match (vfio, dev.netdevs.first()) {
            (true, _) => None,
            (false, Some(n)) => Some(n.clone()),
            (false, None) => {
                return Err(conf_err(format!(
                    "deviceID: {device} (driver {}) has no netdev in the host",
                    dev.driver.as_deref().unwrap_or("?")
                )))
            }
        };
        let wants_pf = c.vlan.is_some()
            || c.spoofchk.is_some()
            || c.trust.is_some()
            || c.link_state.is_some()
            || c.min_tx_rate.is_some()
            || c.max_tx_rate.is_some();
        // Only a VF goes to a pod, as with sriov-cni: a PF (with every VF on it) or a
        // plain NIC would take the node's own network.
        let vf = dev.vf_of.as_ref().ok_or_else(|| {
            conf_err(format!(
                "deviceID: {device} is not an SR-IOV VF (a PF or a NIC without SR-IOV is never given to a pod)"
            ))
        })?;
        let pf_link = match &vf.pf_netdev {
            Some(pf_netdev) => Some((pf_netdev.clone(), vf.index)),
            None if wants_pf => {
                return Err(conf_err(format!(
                    "deviceID: the PF {} of {device} has no netdev, so vlan, spoofchk, trust, link_state and rates cannot be set",
                    vf.pf
                )))
            }
            None => None,
        };
        let host_nl = Netlink::here().map_err(|e| io_err(e.to_string()))?;
        let pod_nl = if vfio {
            None
        } else {
            let nl = Netlink::in_netns(Path::new(&target.netns)).map_err(|e| {
                CniError::new(ErrorCode::InvalidEnvironment, format!("CNI_NETNS: {e}"))
            })?;
            if nl
                .link(target.ifname)
                .map_err(|e| io_err(e.to_string()))?
                .is_some()
            {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_IFNAME: {} already exists in the pod", target.ifname),
                ));
            }
            Some(nl)
        };
        // Everything about to change, saved before anything changes.
        let host = match &host_name {
            Some(n) => Some(
                host_nl
                    .link(n)
                    .map_err(|e| io_err(e.to_string()))?
                    .ok_or_else(|| {
                        conf_err(format!(
                            "deviceID: {device}'s netdev {n} is not in the host netns"
                        ))
                    })?,
            ),
            None => None,
        };
        let pf = match &pf_link {
            Some((pf_netdev, vf)) => {
                let pf_state = host_nl
                    .link(pf_netdev)
                    .map_err(|e| io_err(e.to_string()))?
                    .ok_or_else(|| {
                        conf_err(format!(
                            "deviceID: PF netdev {pf_netdev} of {device} is not in the host netns"
                        ))
                    })?;
                let before = host_nl
                    .vf_settings(pf_state.index, *vf)
                    .map_err(|e| io_err(format!("PF {pf_netdev}: {e}")))?;
                Some(PfSide {
                    pf_netdev: pf_netdev.clone(),
                    vf: *vf,
                    before,
                    changed: VfSettings::default(),
                    pending: VfSettings::default(),
                })
            }
            None => None,
        };
        let mut record = VfRecord {
            device: device.clone(),
            container_id: target.container_id.to_string(),
            netns: target.netns.to_string(),
            ifname: target.ifname.to_string(),
            host,
            pf,
            ipam: false,
            boot_id: boot_id(),
        };
        self.save(&record)?;
        match self.apply(target, c, &host_nl, pod_nl.as_ref(), &mut record) {
            Ok(v) => Ok(AddOutcome::Done(v)),
            Err(e) => {
                let mut undo = Vec::new();
                // IPAM ran (it may have failed after taking an address, or been killed
                // on its timeout): its DEL is owed, and a failed one is kept owed.
                if record.ipam {
                    match self.ipam_call(c, Command::Del, target) {
                        Ok(_) => {
                            record.ipam = false;
                            let _ = self.save(&record);
                        }
                        Err(d) => undo.push(format!("releasing the IPAM address: {}", d.msg)),
                    }
                }
                undo.extend(self.restore(&record, target));
                if undo.is_empty() {
                    let _ = std::fs::remove_file(self.record_path(&device));
                    Err(e)
                } else {
                    // The state file stays for the DEL the caller now owes.
                    Ok(AddOutcome::Unfinished(e.with_details(format!(
                        "undoing it also failed: {}",
                        undo.join("; ")
                    ))))
                }
            }
        }
    }

    fn apply(
        &self,
        target: &Target,
        c: &SriovConf,
        host_nl: &Netlink,
        pod_nl: Option<&Netlink>,
        record: &mut VfRecord,
    ) -> Result<Value, CniError> {
        let fail = |e: crate::link::LinkError| io_err(format!("{}: {e}", record.device));
        if let Some(pf) = &record.pf {
            let pf_index = host_nl
                .link(&pf.pf_netdev)
                .map_err(fail)?
                .ok_or_else(|| io_err(format!("PF netdev {} vanished", pf.pf_netdev)))?
                .index;
            let rate = match (c.min_tx_rate, c.max_tx_rate) {
                (None, None) => None,
                (min, max) => {
                    let (bmin, bmax) = pf.before.rate.unwrap_or((0, 0));
                    Some((min.unwrap_or(bmin), max.unwrap_or(bmax)))
                }
            };
            let want = VfSettings {
                mac: c.mac,
                vlan: c
                    .vlan
                    .map(|v| (v, c.vlan_qos.unwrap_or(0), c.vlan_proto_ad)),
                spoofchk: c.spoofchk,
                trust: c.trust,
                link_state: c.link_state,
                rate,
            };
            // One setting at a time, each recorded once the PF took it: a setting the
            // driver refuses was never made, so nothing tries to put it back.
            // An agent killed between the two leaves it pending: put back too, but a
            // refusal to put back a pending setting (never applied) is not an error.
            let pf_vf = pf.vf;
            for part in want.parts() {
                if let Some(p) = record.pf.as_mut() {
                    p.pending = part.clone();
                }
                self.save(record)?;
                let set = host_nl.set_vf(pf_index, pf_vf, &part);
                if let Some(p) = record.pf.as_mut() {
                    p.pending = VfSettings::default();
                    if set.is_ok() {
                        p.changed.merge(&part);
                    }
                }
                self.save(record)?;
                set.map_err(|e| io_err(e.to_string()))?;
            }
        }
        let mut iface = Interface {
            name: target.ifname.to_string(),
            sandbox: Some(target.netns.to_string()),
            pci_id: Some(record.device.clone()),
            ..Default::default()
        };
        let mut link_index = None;
        if let (Some(host), Some(pod_nl)) = (&record.host, pod_nl) {
            let tmp = temp_name(&record.device);
            host_nl
                .set(
                    host.index,
                    "moving the VF netdev into the pod",
                    &LinkChange {
                        name: Some(&tmp),
                        up: Some(false),
                        netns: Some(Path::new(target.netns)),
                        ..Default::default()
                    },
                )
                .map_err(fail)?;
            let moved = pod_nl
                .link(&tmp)
                .map_err(fail)?
                .ok_or_else(|| io_err(format!("{tmp} did not arrive in the pod")))?;
            pod_nl
                .set(
                    moved.index,
                    "naming and configuring the VF in the pod",
                    &LinkChange {
                        name: Some(target.ifname),
                        mtu: c.mtu,
                        mac: c.mac,
                        ..Default::default()
                    },
                )
                .map_err(fail)?;
            pod_nl
                .set(
                    moved.index,
                    "bringing the VF up",
                    &LinkChange {
                        up: Some(true),
                        ..Default::default()
                    },
                )
                .map_err(fail)?;
            let now = pod_nl.link_by_index(moved.index).map_err(fail)?;
            iface.mac = now.as_ref().and_then(|l| l.mac).map(|m| format_mac(&m));
            iface.mtu = now.and_then(|l| l.mtu);
            link_index = Some(moved.index);
        } else if let Some(m) = c.mac {
            iface.mac = Some(format_mac(&m));
        }
        let mut result = CniResult {
            cni_version: c.cni_version.clone(),
            interfaces: vec![iface],
            ..Default::default()
        };
        record.ipam = c.has_ipam();
        self.save(record)?;
        // Any failure from here on is undone by add(), IPAM's DEL included (unless
        // IPAM reported its own failure: then it holds nothing).
        let ipam = match crate::kinds::ipam_add(&self.ipam, &c.raw, target) {
            Ok(ipam) => ipam,
            Err(f) => {
                if !f.owes_del {
                    record.ipam = false;
                    self.save(record)?;
                }
                return Err(f.error);
            }
        };
        if let Some(ipam) = ipam {
            self.apply_ipam(&ipam, pod_nl.zip(link_index), &mut result)?;
        }
        result
            .to_value(&c.cni_version)
            .map_err(|e| io_err(format!("result: {e}")))
    }

    /// Puts IPAM's addresses and routes on the VF in the pod (`link`: none for vfio)
    /// and into the result.
    fn apply_ipam(
        &self,
        ipam: &CniResult,
        link: Option<(&Netlink, u32)>,
        result: &mut CniResult,
    ) -> Result<(), CniError> {
        let fail = |e: crate::link::LinkError| io_err(e.to_string());
        for ip in &ipam.ips {
            let (addr, prefix) = ip
                .address
                .split_once('/')
                .and_then(|(a, p)| Some((a.parse().ok()?, p.parse().ok()?)))
                .ok_or_else(|| io_err(format!("IPAM gave a bad address {}", ip.address)))?;
            if let Some((nl, idx)) = link {
                nl.add_address(idx, addr, prefix).map_err(fail)?;
            }
            result.ips.push(IpConfig {
                interface: Some(0),
                ..ip.clone()
            });
        }
        if let Some((nl, idx)) = link {
            for r in &ipam.routes {
                let (dst, prefix) = r
                    .dst
                    .split_once('/')
                    .and_then(|(a, p)| Some((a.parse().ok()?, p.parse().ok()?)))
                    .ok_or_else(|| io_err(format!("IPAM gave a bad route {}", r.dst)))?;
                let gw = r.gw.as_deref().and_then(|g| g.parse().ok()).or_else(|| {
                    ipam.ips
                        .iter()
                        .find_map(|i| i.gateway.as_deref()?.parse().ok())
                });
                nl.add_route(idx, dst, prefix, gw).map_err(fail)?;
            }
        }
        result.routes = ipam.routes.clone();
        result.dns = ipam.dns.clone();
        Ok(())
    }

    /// Puts back everything `r` says was changed; returns what could not be.
    fn restore(&self, r: &VfRecord, target: &Target) -> Vec<String> {
        let mut failed = Vec::new();
        let host_nl = match Netlink::here() {
            Ok(n) => n,
            Err(e) => return vec![e.to_string()],
        };
        if let Some(host) = &r.host {
            let tmp = temp_name(&r.device);
            // Where is it now: still in the pod (by its pod or temporary name), or
            // back in the host (the pod netns is gone, or it never left).
            let netns_there =
                !r.netns.is_empty() && crate::netns::open(Path::new(&r.netns)).is_ok();
            if netns_there {
                match Netlink::in_netns(Path::new(&r.netns)) {
                    Ok(pod) => {
                        for name in [r.ifname.as_str(), tmp.as_str()] {
                            if let Ok(Some(l)) = pod.link(name) {
                                if let Err(e) = pod.set(
                                    l.index,
                                    "moving the VF back to the host",
                                    &LinkChange {
                                        name: Some(&tmp),
                                        up: Some(false),
                                        netns: Some(Path::new(HOST_NETNS)),
                                        ..Default::default()
                                    },
                                ) {
                                    failed.push(e.to_string());
                                }
                                break;
                            }
                        }
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            // The PF lets go of the VF's MAC before the netdev takes its own back.
            failed.extend(self.restore_pf(r, &host_nl));
            let in_host = [tmp.as_str(), host.name.as_str(), r.ifname.as_str()]
                .into_iter()
                .find_map(|n| host_nl.link(n).ok().flatten())
                .or_else(|| {
                    // A pod netns that died sends the VF back under whatever name it
                    // had; sysfs knows it by PCI address.
                    let addr = r.device.parse().ok()?;
                    let d = self.sysfs.device(addr)?;
                    host_nl.link(d.netdevs.first()?).ok().flatten()
                });
            match in_host {
                Some(l) => {
                    if let Err(e) = host_nl.set(
                        l.index,
                        "restoring the VF netdev",
                        &LinkChange {
                            name: (l.name != host.name).then_some(host.name.as_str()),
                            mtu: host.mtu,
                            mac: host.mac,
                            up: Some(host.up),
                            ..Default::default()
                        },
                    ) {
                        failed.push(e.to_string());
                    }
                }
                None => {
                    tracing::warn!(device = %r.device, "VF netdev {} is gone; nothing to restore", host.name)
                }
            }
        }
        if r.host.is_none() {
            failed.extend(self.restore_pf(r, &host_nl));
        }
        let _ = target;
        failed
    }

    fn restore_pf(&self, r: &VfRecord, host_nl: &Netlink) -> Vec<String> {
        let mut failed = Vec::new();
        if let Some(pf) = &r.pf {
            match host_nl.link(&pf.pf_netdev) {
                Ok(Some(l)) => {
                    let back = settings_back(r, pf, &pf.changed);
                    if let Err(e) = host_nl.set_vf(l.index, pf.vf, &back) {
                        failed.push(e.to_string());
                    }
                    // A pending one may never have been applied: a refusal is noted.
                    if !pf.pending.is_empty() {
                        let back = settings_back(r, pf, &pf.pending);
                        if let Err(e) = host_nl.set_vf(l.index, pf.vf, &back) {
                            tracing::info!(device = %r.device, "putting back a setting that may never have been applied: {e}");
                        }
                    }
                }
                Ok(None) => failed.push(format!("PF netdev {} is gone", pf.pf_netdev)),
                Err(e) => failed.push(e.to_string()),
            }
        }
        failed
    }

    fn del(&self, target: &Target, raw: &Map<String, Value>) -> Result<(), CniError> {
        // A conf broken since ADD must not strand the VF: take what can be read.
        let c = conf::parse(raw).unwrap_or_else(|_| SriovConf {
            device_id: raw
                .get("deviceID")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok()),
            ..conf::parse(&Map::new()).expect("empty conf parses")
        });
        let Some(addr) = c.device_id else {
            return Ok(());
        };
        let device = addr.to_string();
        let _guard = self.lock(&device);
        let record = self.record(&device)?;
        let mine = record
            .as_ref()
            .filter(|r| r.container_id == target.container_id);
        let mut errors = Vec::new();
        if mine.is_none_or(|r| r.ipam) && c.has_ipam() {
            if let Err(e) = self.ipam_call(&c, Command::Del, target) {
                errors.push(e.msg);
            }
        }
        if let Some(r) = mine {
            errors.extend(self.restore(r, target));
            if errors.is_empty() {
                let _ = std::fs::remove_file(self.record_path(&device));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(io_err(format!("{device}: {}", errors.join("; "))))
        }
    }

    fn check(&self, target: &Target, c: &SriovConf) -> Result<(), CniError> {
        let (addr, _) = self.device(c)?;
        let r = self
            .record(&addr.to_string())?
            .filter(|r| r.container_id == target.container_id)
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::UnknownContainer,
                    format!("{addr} is not attached to this container"),
                )
            })?;
        if r.host.is_some() {
            let nl =
                Netlink::in_netns(Path::new(target.netns)).map_err(|e| io_err(e.to_string()))?;
            let l = nl
                .link(target.ifname)
                .map_err(|e| io_err(e.to_string()))?
                .ok_or_else(|| io_err(format!("{} is missing from the pod", target.ifname)))?;
            if let (Some(want), Some(have)) = (c.mac, l.mac) {
                if want != have {
                    return Err(io_err(format!(
                        "{} has MAC {}, not {}",
                        target.ifname,
                        format_mac(&have),
                        format_mac(&want)
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The settings that put back `c` (some of what ADD set) as they were before.
fn settings_back(r: &VfRecord, pf: &PfSide, c: &VfSettings) -> VfSettings {
    let b = &pf.before;
    // A VF MAC the PF reports equal to the netdev's own was the VF's choice, not an
    // administrative one: clearing it (all zeros) lets the netdev take its MAC back;
    // restating it would pin it.
    let vf_chosen = r.host.as_ref().and_then(|h| h.mac).is_some()
        && r.host.as_ref().and_then(|h| h.mac) == b.mac;
    let mac_back = if vf_chosen {
        Some([0; 6])
    } else {
        b.mac.or(Some([0; 6]))
    };
    VfSettings {
        mac: c.mac.and(mac_back),
        vlan: c.vlan.and(b.vlan.or(Some((0, 0, false)))),
        spoofchk: c.spoofchk.and(b.spoofchk),
        trust: c.trust.and(b.trust),
        link_state: c.link_state.and(b.link_state),
        rate: c.rate.and(b.rate.or(Some((0, 0)))),
    }
}

impl InProcessPlugins for SriovPlugin {
    fn handles(&self, plugin: &str) -> bool {
        plugin == TYPE
    }

    fn exec(
        &self,
        plugin: &str,
        command: Command,
        target: &Target,
        stdin: &[u8],
    ) -> Result<Vec<u8>, InvokeError> {
        let fail = |error: CniError| crate::kinds::plugin_error(plugin, command, error);
        let raw: Map<String, Value> = serde_json::from_slice(stdin)
            .map_err(|e| fail(CniError::new(ErrorCode::Decode, format!("config: {e}"))))?;
        let out = match command {
            Command::Add => {
                let c = conf::parse(&raw).map_err(|m| fail(conf_err(m)))?;
                match self.add(target, &c).map_err(fail)? {
                    AddOutcome::Done(v) => v,
                    AddOutcome::Unfinished(error) => {
                        return Err(InvokeError::Unfinished {
                            plugin: plugin.to_string(),
                            command: command.as_str(),
                            error: Box::new(error),
                        })
                    }
                }
            }
            Command::Del => {
                self.del(target, &raw).map_err(fail)?;
                return Ok(Vec::new());
            }
            Command::Check => {
                let c = conf::parse(&raw).map_err(|m| fail(conf_err(m)))?;
                self.check(target, &c).map_err(fail)?;
                return Ok(Vec::new());
            }
            Command::Status | Command::Gc => return Ok(Vec::new()),
            Command::Version => {
                json!({"cniVersion": "1.1.0", "supportedVersions": trellis_cni::version::SUPPORTED})
            }
        };
        Ok(out.to_string().into_bytes())
    }
}
