//! The eBPF dataplane: the TCX programs (ebpf/programs, embedded at build time) loaded
//! once, attached to each pod interface an attachment makes, with per-attachment
//! counters. Maps and links are pinned under one bpffs dir, so the agent can restart
//! (counters and attachments stay; the maps are re-adopted by name) and `trellis stats`
//! can read everything from the pins alone.

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, LinkOrder};
use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use trellis_ebpf_common::{
    AclHeader, AclInfo, AclRule, Counters, IfKey, IntervalV4, IntervalV6, SlotMeta, TableRef,
    ACL_HIT_DEFAULT, ACL_HIT_STRIDE, ACL_SPACE, DIR_EGRESS, DIR_INGRESS, LAYOUT_VERSION, MAX_ACLS,
    MAX_SLOTS, RULE_SPACE,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/trellis-tc"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{dir} is not on a bpffs (mount one: mount -t bpf bpf /sys/fs/bpf)")]
    NoBpffs { dir: String },
    #[error("the pins in {dir} are layout {found} and this agent's are layout {LAYOUT_VERSION}: they cannot be re-adopted. Remove the directory to start over (rm -r {dir}: it detaches the programs from every pod interface and resets the counters; restart the agent and its records re-attach live pods)")]
    Layout { dir: String, found: String },
    #[error("{field} {value:?} is {len} bytes; the dataplane holds at most {max} (names are kept whole, never cut)")]
    NameTooLong {
        field: &'static str,
        value: String,
        len: usize,
        max: usize,
    },
    #[error("loading the eBPF programs: {0}")]
    Load(String),
    #[error("attaching to {ifname}: {message} (TCX needs Linux 6.6 or later)")]
    Attach { ifname: String, message: String },
    #[error("{what}: {message}")]
    Op { what: String, message: String },
    #[error("all {MAX_SLOTS} attachment slots are in use")]
    Full,
    #[error("network {0}: all {MAX_ACLS} ACL ids are in use by other networks")]
    AclFull(String),
    #[error("network {network}: its ACL needs {need} more {what} entries than are free in the shared table space ({cap} in all, the rest held by other networks' ACLs)")]
    AclSpace {
        network: String,
        what: &'static str,
        need: u32,
        cap: u32,
    },
}

fn op(what: impl Into<String>) -> impl FnOnce(String) -> DataplaneError {
    let what = what.into();
    move |message| DataplaneError::Op { what, message }
}

/// Who an attachment belongs to (what `trellis stats` labels its counters with).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Owner {
    pub namespace: String,
    pub pod: String,
    pub network: String,
    pub ifname: String,
    pub container: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotStats {
    pub slot: u32,
    pub owner: Owner,
    pub ingress: CountersView,
    pub egress: CountersView,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct CountersView {
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
}

impl From<Counters> for CountersView {
    fn from(c: Counters) -> Self {
        CountersView {
            packets: c.packets,
            bytes: c.bytes,
            drops: c.drops,
        }
    }
}

/// `s` into a NUL-padded field, whole, or an error naming the field.
fn put(dst: &mut [u8], field: &'static str, s: &str) -> Result<(), DataplaneError> {
    if s.len() > dst.len() || s.as_bytes().contains(&0) {
        return Err(DataplaneError::NameTooLong {
            field,
            value: s.to_string(),
            len: s.len(),
            max: dst.len(),
        });
    }
    dst[..s.len()].copy_from_slice(s.as_bytes());
    dst[s.len()..].fill(0);
    Ok(())
}

fn get(src: &[u8]) -> String {
    let end = src.iter().position(|b| *b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..end]).into_owned()
}

/// The slot's owner as the map keeps it; a name that does not fit whole is refused.
fn slot_meta(owner: &Owner) -> Result<SlotMeta, DataplaneError> {
    let mut m = SlotMeta::default();
    put(&mut m.namespace, "namespace", &owner.namespace)?;
    put(&mut m.pod, "pod", &owner.pod)?;
    put(&mut m.network, "network", &owner.network)?;
    put(&mut m.ifname, "interface", &owner.ifname)?;
    put(&mut m.container, "container", &owner.container)?;
    Ok(m)
}

fn owner_of(m: &SlotMeta) -> Owner {
    Owner {
        namespace: get(&m.namespace),
        pod: get(&m.pod),
        network: get(&m.network),
        ifname: get(&m.ifname),
        container: get(&m.container),
    }
}

/// Checks that `dir` is, or would be created, on a bpffs.
pub fn check_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    let mut p = Some(dir);
    while let Some(d) = p {
        if d.exists() {
            let on_bpffs = nix::sys::statfs::statfs(d)
                .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
            if on_bpffs {
                return Ok(());
            }
            return Err(DataplaneError::NoBpffs {
                dir: dir.display().to_string(),
            });
        }
        p = d.parent();
    }
    Err(DataplaneError::NoBpffs {
        dir: dir.display().to_string(),
    })
}

/// Loads (verifies) the TC classifier `name` of an object.
pub(crate) fn load_classifier(bpf: &mut Ebpf, name: &str) -> Result<(), DataplaneError> {
    let p: &mut SchedClassifier = bpf
        .program_mut(name)
        .ok_or_else(|| DataplaneError::Load(format!("no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
    p.load()
        .map_err(|e| DataplaneError::Load(format!("{name}: {e}")))
}

/// The netns cookie (SO_NETNS_COOKIE) of the calling thread's namespace.
fn netns_cookie() -> Result<u64, String> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    // nix has no SO_NETNS_COOKIE (include/uapi/asm-generic/socket.h: 71).
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own, into a u64 of the length we pass.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!(
            "SO_NETNS_COOKIE: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(cookie)
}

fn ifindex(ifname: &str) -> Result<u32, String> {
    nix::net::if_::if_nametoindex(ifname).map_err(|e| format!("no interface {ifname}: {e}"))
}

/// What attaching in a pod's netns gives back: the interface, and a link per direction.
type Attached = (IfKey, Vec<(&'static str, FdLink)>);

pub struct Dataplane {
    bpf: Ebpf,
    dir: PathBuf,
    /// Made once: a new loader parses the kernel's BTF (tens of ms) every time.
    loader: EbpfLoader<'static>,
    /// The ACL table spaces, mapped: IPv4 intervals, IPv6 intervals, rules.
    iv4: Mapped<IntervalV4>,
    iv6: Mapped<IntervalV6>,
    rules: Mapped<AclRule>,
    /// The rule hit counters, mapped (an ACL's are zeroed as memory).
    hits: Mapped<u64>,
    /// When table regions were last given up (slots moved off them): they are not
    /// written again until every program that may still be reading them has returned.
    freed_at: Option<std::time::Instant>,
}

/// Longer than any program run (a TC program is not preempted and runs for
/// microseconds): after this, nothing reads a region the slots moved off.
const REGION_QUIET: std::time::Duration = std::time::Duration::from_millis(5);

/// A BPF_F_MMAPABLE array map, mapped into the agent: table regions are written as
/// memory (the programs read the same pages), not one syscall per entry.
struct Mapped<T> {
    ptr: *mut T,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by the Dataplane, which is used behind a Mutex.
unsafe impl<T> Send for Mapped<T> {}

impl<T: Copy> Mapped<T> {
    fn new(bpf: &Ebpf, name: &str, len: u32) -> Result<Mapped<T>, DataplaneError> {
        let map = match bpf.map(name) {
            Some(aya::maps::Map::Array(d)) => d,
            _ => return Err(DataplaneError::Load(format!("no array map {name}"))),
        };
        use nix::sys::mman::ProtFlags;
        Self::map(map, name, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE)
    }

    /// A pinned map opened by `trellis stats`, mapped read-only.
    fn read_only(map: &MapData, name: &str, len: u32) -> Result<Mapped<T>, DataplaneError> {
        Self::map(map, name, len, nix::sys::mman::ProtFlags::PROT_READ)
    }

    fn map(
        map: &MapData,
        name: &str,
        len: u32,
        prot: nix::sys::mman::ProtFlags,
    ) -> Result<Mapped<T>, DataplaneError> {
        // Array entries are 8-byte aligned; ours are multiples of 8.
        assert_eq!(std::mem::size_of::<T>() % 8, 0);
        let bytes = (len as usize * std::mem::size_of::<T>()).next_multiple_of(4096);
        let size = std::num::NonZeroUsize::new(bytes).expect("a map has entries");
        // SAFETY: a shared mapping of the map's own pages (BPF_F_MMAPABLE), of the
        // map's size, unmapped on drop; nothing else in this process maps them.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                size,
                prot,
                nix::sys::mman::MapFlags::MAP_SHARED,
                map.fd().as_fd(),
                0,
            )
        }
        .map_err(|e| op(format!("mapping {name}"))(e.to_string()))?;
        Ok(Mapped {
            ptr: ptr.as_ptr() as *mut T,
            len: len as usize,
            bytes,
        })
    }

    fn read(&self, at: u32, n: u32) -> &[T] {
        let end = (at as usize + n as usize).min(self.len);
        let at = (at as usize).min(end);
        // SAFETY: in bounds; plain data written only by the agent (torn reads of a
        // region being rewritten only misname a rule once).
        unsafe { std::slice::from_raw_parts(self.ptr.add(at), end - at) }
    }

    fn write(&mut self, at: u32, items: &[T]) {
        assert!(
            at as usize + items.len() <= self.len,
            "region within the map"
        );
        // SAFETY: in bounds (checked); T is plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(items.as_ptr(), self.ptr.add(at as usize), items.len())
        };
    }
}

impl Mapped<u64> {
    /// Counters the programs are still adding to, each read atomically.
    fn load(&self, at: u32, n: u32) -> Vec<u64> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let end = (at as usize + n as usize).min(self.len);
        let at = (at as usize).min(end);
        (at..end)
            .map(|i| {
                // SAFETY: in bounds, 8-byte aligned, and the kernel only ever changes
                // these with atomic adds.
                unsafe { AtomicU64::from_ptr(self.ptr.add(i)) }.load(Ordering::Relaxed)
            })
            .collect()
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        if let Some(p) = std::ptr::NonNull::new(self.ptr as *mut std::ffi::c_void) {
            // SAFETY: our own mapping of `bytes`, not used after this.
            let _ = unsafe { nix::sys::mman::munmap(p, self.bytes) };
        }
    }
}

/// First fit for `need` entries in a space of `cap` entries, avoiding `used`
/// (start, len) regions; marks the region used.
fn first_fit(used: &mut Vec<(u32, u32)>, need: u32, cap: u32) -> Option<u32> {
    if need == 0 {
        return Some(0);
    }
    used.sort_unstable();
    let mut at = 0u32;
    for &(start, len) in used.iter() {
        if start >= at && start - at >= need {
            break;
        }
        at = at.max(start + len);
    }
    if cap - at.min(cap) < need {
        return None;
    }
    used.push((at, need));
    Some(at)
}

/// Every slot number as a static, for the loader's `SLOT` override (it borrows the
/// value for as long as the loader lives).
static SLOT_VALUES: [u32; MAX_SLOTS as usize] = {
    let mut v = [0u32; MAX_SLOTS as usize];
    let mut i = 0;
    while i < v.len() {
        v[i] = i as u32;
        i += 1;
    }
    v
};

/// The programs on the pod's interface: (program, hook, link pin suffix).
const PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("trellis_ingress", TcAttachType::Ingress, "ingress"),
    ("trellis_egress", TcAttachType::Egress, "egress"),
];

/// The program on the host side of a pod's veth (its ingress: what the pod sends).
const PEER_PROGRAM: (&str, TcAttachType, &str) = ("trellis_peer", TcAttachType::Ingress, "peer");

/// Every link pin suffix of a slot.
const LINK_SUFFIXES: [&str; 3] = ["ingress", "egress", "peer"];

/// The maps the programs pin (a dir with any of them holds pins to re-adopt).
const PINNED_MAPS: [&str; 10] = [
    "STATS",
    "META",
    "LAYOUT",
    "SLOT_ACL",
    "ACL_HDR",
    "ACL_IV4",
    "ACL_IV6",
    "ACL_RULES",
    "ACL_INFO",
    "RULE_HITS",
];

/// Whether the pinned owner map in `dir` is empty (or absent).
fn no_owners(dir: &Path) -> bool {
    let Ok(m) = MapData::from_pin(dir.join("META")) else {
        return true;
    };
    BpfHashMap::<MapData, u32, SlotMeta>::try_from(aya::maps::Map::HashMap(m))
        .map(|m| m.keys().next().is_none())
        .unwrap_or(false)
}

/// Refuses pins of another layout in `dir` (their sizes and shapes differ from what
/// the programs expect); a dir without pins is fine.
fn check_layout(dir: &Path) -> Result<(), DataplaneError> {
    if !PINNED_MAPS.iter().any(|m| dir.join(m).exists()) {
        return Ok(());
    }
    let found = match MapData::from_pin(dir.join("LAYOUT")) {
        Err(_) => "1 (no LAYOUT pin)".to_string(),
        Ok(m) => {
            let layout: Array<MapData, u32> = Array::try_from(aya::maps::Map::Array(m))
                .map_err(|e| op("LAYOUT map")(e.to_string()))?;
            match layout.get(&0, 0) {
                Ok(v) if v == LAYOUT_VERSION => return Ok(()),
                // Pinned by a start that died before writing its version (older
                // agents wrote it last): ours if nothing was ever attached.
                Ok(0) if no_owners(dir) => return Ok(()),
                Ok(v) => v.to_string(),
                Err(e) => format!("unreadable ({e})"),
            }
        }
    };
    Err(DataplaneError::Layout {
        dir: dir.display().to_string(),
        found,
    })
}

impl Dataplane {
    /// Loads the programs, re-adopting maps already pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Dataplane, DataplaneError> {
        check_bpffs(dir)?;
        check_layout(dir)?;
        std::fs::create_dir_all(dir.join("links"))
            .map_err(|e| op(format!("creating {}", dir.display()))(e.to_string()))?;
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(OBJECT)
            .map_err(|e| DataplaneError::Load(e.to_string()))?;
        // The maps are pinned now: say which layout they are before anything can fail.
        let mut layout: Array<&mut MapData, u32> =
            Array::try_from(bpf.map_mut("LAYOUT").expect("LAYOUT in the object"))
                .map_err(|e| op("LAYOUT map")(e.to_string()))?;
        layout
            .set(0, LAYOUT_VERSION, 0)
            .map_err(|e| op("LAYOUT map")(e.to_string()))?;
        for (name, _, _) in PROGRAMS.iter().chain([&PEER_PROGRAM]) {
            load_classifier(&mut bpf, name)?;
        }
        // The programs use no CO-RE relocations, so the kernel's BTF (parsed by
        // `new`, ~20 MB in memory) is not needed for the per-attachment loads.
        let mut loader = EbpfLoader::new();
        loader.btf(None).default_map_pin_directory(dir);
        Ok(Dataplane {
            iv4: Mapped::new(&bpf, "ACL_IV4", ACL_SPACE)?,
            iv6: Mapped::new(&bpf, "ACL_IV6", ACL_SPACE)?,
            rules: Mapped::new(&bpf, "ACL_RULES", RULE_SPACE)?,
            hits: Mapped::new(&bpf, "RULE_HITS", MAX_ACLS * ACL_HIT_STRIDE)?,
            freed_at: None,
            bpf,
            dir: dir.to_path_buf(),
            loader,
        })
    }

    fn link_pin(&self, slot: u32, suffix: &str) -> PathBuf {
        self.dir.join("links").join(format!("{slot}-{suffix}"))
    }

    fn meta(&mut self) -> Result<BpfHashMap<&mut MapData, u32, SlotMeta>, DataplaneError> {
        BpfHashMap::try_from(self.bpf.map_mut("META").expect("META in the object"))
            .map_err(|e| op("META map")(e.to_string()))
    }

    /// A slot no attachment holds.
    fn free_slot(&mut self) -> Result<u32, DataplaneError> {
        let meta = self.meta()?;
        let used: std::collections::HashSet<u32> = meta.keys().filter_map(Result::ok).collect();
        (0..MAX_SLOTS)
            .find(|s| !used.contains(s))
            .ok_or(DataplaneError::Full)
    }

    /// Attaches the programs to `ifname` in the netns at `netns`, and the egress
    /// check to the host side of its veth when that is in the agent's netns; returns
    /// its slot.
    pub fn attach(&mut self, netns: &Path, owner: &Owner) -> Result<u32, DataplaneError> {
        // Every name fits whole, or nothing is attached.
        let mut meta = slot_meta(owner)?;
        let slot = self.free_slot()?;
        let mut inst = self.instance(slot)?;
        let mut progs: Vec<(TcAttachType, &'static str, &mut SchedClassifier)> = Vec::new();
        for (name, p) in inst.programs_mut() {
            if let Some((_, t, suffix)) = PROGRAMS.iter().find(|(n, _, _)| *n == name) {
                let p: &mut SchedClassifier =
                    p.try_into().map_err(|e: aya::programs::ProgramError| {
                        DataplaneError::Load(e.to_string())
                    })?;
                progs.push((*t, suffix, p));
            }
        }
        // The network's rules apply from the first packet the links see.
        let header = self.acl_entry(&owner.network)?.map(|(_, i)| i.header);
        self.set_slot_acl(slot, header)?;
        let ifname = owner.ifname.clone();
        let attach_err = |m: String| DataplaneError::Attach {
            ifname: owner.ifname.clone(),
            message: m,
        };
        // Attach inside the pod's netns: interface names resolve there.
        let r = crate::netns::run_in(netns, move || -> Result<Attached, String> {
            let ifindex = ifindex(&ifname)?;
            let cookie = netns_cookie()?;
            let mut links = Vec::new();
            for (attach_type, suffix, p) in progs {
                let id = p
                    .attach_with_options(
                        &ifname,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(|e| e.to_string())?;
                let link = p.take_link(id).map_err(|e| e.to_string())?;
                let fd: FdLink = link
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| e.to_string())?;
                links.push((suffix, fd));
            }
            Ok((
                IfKey {
                    netns_cookie: cookie,
                    ifindex,
                    _pad: 0,
                },
                links,
            ))
        })
        .map_err(|e| attach_err(format!("entering {}: {e}", netns.display())))
        .and_then(|r| r.map_err(attach_err));
        let (key, mut links) = match r {
            Ok(v) => v,
            Err(e) => {
                let _ = self.set_slot_acl(slot, None);
                return Err(e);
            }
        };
        meta.key = key;
        // The host side of a veth: the pod's egress rules again, where a pod that
        // bypasses its own egress hook cannot skip them.
        match self.attach_peer(&mut inst, netns, &owner.ifname) {
            Ok(Some((index, link))) => {
                meta.peer_ifindex = index;
                links.push((PEER_PROGRAM.2, link));
            }
            Ok(None) => {}
            Err(e) => {
                let _ = self.set_slot_acl(slot, None);
                return Err(e);
            }
        }
        // Zeroed counters and the slot's owner before the links are kept.
        if let Err(e) = self.own(slot, meta) {
            let _ = self.set_slot_acl(slot, None);
            return Err(e);
        }
        for (suffix, link) in links {
            let pin = self.link_pin(slot, suffix);
            let _ = std::fs::remove_file(&pin);
            if let Err(e) = link.pin(&pin) {
                // Links not yet pinned detach as they drop; the pinned one and the
                // slot's owner go here, so nothing of this attachment is left.
                let _ = self.detach(slot);
                return Err(op(format!("pinning {}", pin.display()))(e.to_string()));
            }
        }
        Ok(slot)
    }

    /// Attaches the peer program to the host side of the pod's veth `ifname`, if it
    /// has one in the agent's netns: its ifindex and link.
    fn attach_peer(
        &mut self,
        inst: &mut Ebpf,
        netns: &Path,
        ifname: &str,
    ) -> Result<Option<(u32, FdLink)>, DataplaneError> {
        let err = |m: String| DataplaneError::Attach {
            ifname: format!("the host side of {ifname}"),
            message: m,
        };
        let Some((host, index)) =
            crate::link::host_peer(netns, ifname).map_err(|e| err(e.to_string()))?
        else {
            return Ok(None);
        };
        load_classifier(inst, PEER_PROGRAM.0)?;
        let p: &mut SchedClassifier = inst
            .program_mut(PEER_PROGRAM.0)
            .ok_or_else(|| DataplaneError::Load(format!("no program {}", PEER_PROGRAM.0)))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
        let id = p
            .attach_with_options(
                &host,
                PEER_PROGRAM.1,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|e| err(format!("{host}: {e}")))?;
        let link: FdLink = p
            .take_link(id)
            .map_err(|e| err(e.to_string()))?
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| err(e.to_string()))?;
        Ok(Some((index, link)))
    }

    /// Detaches the attachment in `slot` only if the slot still belongs to
    /// `container`'s `ifname` (after a reboot or a lost pin, the slot number may be
    /// another pod's now). Whether it was detached.
    pub fn detach_owned(
        &mut self,
        slot: u32,
        container: &str,
        ifname: &str,
    ) -> Result<bool, DataplaneError> {
        let mine = self
            .meta()?
            .get(&slot, 0)
            .is_ok_and(|m| get(&m.container) == container && get(&m.ifname) == ifname);
        if mine {
            self.detach(slot)?;
        }
        Ok(mine)
    }

    /// Every slot and who it belongs to.
    pub fn slots(&mut self) -> Result<Vec<(u32, Owner)>, DataplaneError> {
        let meta = self.meta()?;
        let mut out = Vec::new();
        for e in meta.iter() {
            let (slot, m) = e.map_err(|e| op("META map")(e.to_string()))?;
            out.push((slot, owner_of(&m)));
        }
        Ok(out)
    }

    /// Link pins of slots that have no owner (an agent killed between pinning and
    /// recording, or a META entry lost): removed, which detaches them. Their names.
    pub fn remove_orphan_pins(&mut self) -> Result<Vec<String>, DataplaneError> {
        let owned: std::collections::HashSet<u32> =
            self.meta()?.keys().filter_map(Result::ok).collect();
        let dir = self.dir.join("links");
        let mut removed = Vec::new();
        for e in std::fs::read_dir(&dir)
            .map_err(|e| op(format!("reading {}", dir.display()))(e.to_string()))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let slot = name
                .split_once('-')
                .and_then(|(n, _)| n.parse::<u32>().ok());
            if slot.is_none_or(|s| !owned.contains(&s)) {
                std::fs::remove_file(e.path())
                    .map_err(|e| op(format!("unpinning {name}"))(e.to_string()))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// ACLs of networks with no attachment left (a DEL that raced an update, an
    /// agent killed mid-way): dropped, their ids and table space freed. Their networks.
    pub fn drop_unused_acls(&mut self) -> Result<Vec<String>, DataplaneError> {
        let networks: std::collections::HashSet<String> = self.networks()?.into_iter().collect();
        let mut unused = Vec::new();
        for e in self.acl_info()?.iter() {
            let (id, i) = e.map_err(|e| op("ACL_INFO map")(e.to_string()))?;
            if !networks.contains(&get(&i.network)) {
                unused.push((id, get(&i.network)));
            }
        }
        for (id, _) in &unused {
            self.drop_acl(*id)?;
        }
        if !unused.is_empty() {
            self.freed_at = Some(std::time::Instant::now());
        }
        Ok(unused.into_iter().map(|(_, n)| n).collect())
    }

    /// Detaches and forgets the attachment in `slot`: its links (unpinned) and its
    /// owner. Nothing else is touched. (`detach_owned` checks the owner first.)
    pub fn detach(&mut self, slot: u32) -> Result<(), DataplaneError> {
        for suffix in LINK_SUFFIXES {
            let pin = self.link_pin(slot, suffix);
            match std::fs::remove_file(&pin) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(op(format!("unpinning {}", pin.display()))(e.to_string()))
                }
                _ => {}
            }
        }
        let network = self.meta()?.get(&slot, 0).ok().map(|m| get(&m.network));
        let _ = self.meta()?.remove(&slot);
        self.set_slot_acl(slot, None)?;
        // The last attachment of a network takes its ACL tables with it (only then
        // are the other slots looked through).
        if let Some(network) = network {
            if self.acl_entry(&network)?.is_some() {
                self.forget_unused_acl(&network)?;
            }
        }
        Ok(())
    }

    /// Zeroes the slot's counters and records its owner.
    fn own(&mut self, slot: u32, m: SlotMeta) -> Result<(), DataplaneError> {
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| op("counting CPUs")(e.to_string()))?;
        let mut stats: PerCpuArray<&mut MapData, Counters> =
            PerCpuArray::try_from(self.bpf.map_mut("STATS").expect("STATS"))
                .map_err(|e| op("STATS map")(e.to_string()))?;
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let zero =
                PerCpuValues::try_from(vec![Counters::default(); ncpus]).expect("one per CPU");
            stats
                .set(slot * 2 + dir, zero, 0)
                .map_err(|e| op("zeroing counters")(e.to_string()))?;
        }
        self.meta()?
            .insert(slot, m, 0)
            .map_err(|e| op("META map")(e.to_string()))?;
        Ok(())
    }

    /// Loads an instance of the programs for `slot` (not attached anywhere).
    fn instance(&mut self, slot: u32) -> Result<Ebpf, DataplaneError> {
        // One instance of the object per attachment, its slot set as a constant; the
        // maps are the pinned ones every instance shares.
        let mut inst = self
            .loader
            .override_global("SLOT", &SLOT_VALUES[slot as usize], true)
            .load(OBJECT)
            .map_err(|e| DataplaneError::Load(e.to_string()))?;
        // The peer program is verified only where there is a host side (attach_peer).
        for (name, _, _) in PROGRAMS {
            load_classifier(&mut inst, name)?;
        }
        Ok(inst)
    }

    /// A slot for `owner` whose programs are loaded but attached nowhere, to run
    /// packets through with BPF_PROG_TEST_RUN (tests, benchmarks). `detach` frees it.
    pub fn probe(&mut self, owner: &Owner) -> Result<Probe, DataplaneError> {
        let slot = self.free_slot()?;
        let meta = slot_meta(owner)?;
        let mut inst = self.instance(slot)?;
        load_classifier(&mut inst, PEER_PROGRAM.0)?;
        let header = self.acl_entry(&owner.network)?.map(|(_, i)| i.header);
        self.set_slot_acl(slot, header)?;
        self.own(slot, meta)?;
        Ok(Probe { slot, inst })
    }

    fn map_mut(&mut self, name: &str) -> &mut aya::maps::Map {
        self.bpf.map_mut(name).expect("map in the object")
    }

    /// Points `slot` at ACL header `header` (None: no ACL).
    fn set_slot_acl(&mut self, slot: u32, header: Option<u32>) -> Result<(), DataplaneError> {
        let mut m: Array<&mut MapData, u32> = Array::try_from(self.map_mut("SLOT_ACL"))
            .map_err(|e| op("SLOT_ACL map")(e.to_string()))?;
        m.set(slot, header.map(|h| h + 1).unwrap_or(0), 0)
            .map_err(|e| op("SLOT_ACL map")(e.to_string()))
    }

    /// Slots whose owner is on `network`.
    pub fn slots_of(&mut self, network: &str) -> Result<Vec<u32>, DataplaneError> {
        let meta = self.meta()?;
        let mut out = Vec::new();
        for e in meta.iter() {
            let (slot, m) = e.map_err(|e| op("META map")(e.to_string()))?;
            if get(&m.network) == network {
                out.push(slot);
            }
        }
        Ok(out)
    }

    fn acl_info(&mut self) -> Result<BpfHashMap<&mut MapData, u32, AclInfo>, DataplaneError> {
        BpfHashMap::try_from(self.map_mut("ACL_INFO"))
            .map_err(|e| op("ACL_INFO map")(e.to_string()))
    }

    /// The ACL id and info of `network` in the maps, if any.
    fn acl_entry(&mut self, network: &str) -> Result<Option<(u32, AclInfo)>, DataplaneError> {
        let info = self.acl_info()?;
        for e in info.iter() {
            let (id, i) = e.map_err(|e| op("ACL_INFO map")(e.to_string()))?;
            if get(&i.network) == network {
                return Ok(Some((id, i)));
            }
        }
        Ok(None)
    }

    /// The ACL id and digest `network` has in the maps, if any.
    pub fn acl_of(&mut self, network: &str) -> Result<Option<(u32, u64)>, DataplaneError> {
        Ok(self.acl_entry(network)?.map(|(id, i)| (id, i.digest)))
    }

    /// Networks that have live attachments.
    pub fn networks(&mut self) -> Result<Vec<String>, DataplaneError> {
        let meta = self.meta()?;
        let mut out = std::collections::BTreeSet::new();
        for e in meta.iter() {
            let (_, m) = e.map_err(|e| op("META map")(e.to_string()))?;
            out.insert(get(&m.network));
        }
        Ok(out.into_iter().collect())
    }

    /// The regions every ACL's current header holds: IPv4 intervals, IPv6 intervals,
    /// rules.
    fn used_regions(&mut self) -> Result<[Vec<(u32, u32)>; 3], DataplaneError> {
        let infos: Vec<AclInfo> = self
            .acl_info()?
            .iter()
            .map(|e| {
                e.map(|(_, i)| i)
                    .map_err(|e| op("ACL_INFO map")(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let hdrs: Array<&mut MapData, AclHeader> = Array::try_from(self.map_mut("ACL_HDR"))
            .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
        let mut used: [Vec<(u32, u32)>; 3] = Default::default();
        for i in infos {
            let h = hdrs
                .get(&i.header, 0)
                .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
            for (k, t) in h.tables.iter().enumerate() {
                used[k / 2].push((t.base, t.len));
                used[2].push((t.rules, t.nrules));
            }
        }
        Ok(used)
    }

    /// Makes `network`'s rules `acl` for every attachment of it, live: the new tables
    /// go into free regions and a header not in use, then each slot is pointed at
    /// that header (one u32 write each); nothing is detached, and a packet sees the
    /// old rules or the new, never a mix. None removes the network's ACL. Returns the
    /// network's ACL id.
    pub fn set_network_acl(
        &mut self,
        network: &str,
        acl: Option<&crate::acl::Acl>,
    ) -> Result<Option<u32>, DataplaneError> {
        let current = self.acl_entry(network)?;
        let Some(acl) = acl else {
            if let Some((id, _)) = current {
                for slot in self.slots_of(network)? {
                    self.set_slot_acl(slot, None)?;
                }
                self.drop_acl(id)?;
                self.freed_at = Some(std::time::Instant::now());
            }
            return Ok(None);
        };
        put(
            &mut [0u8; trellis_ebpf_common::NETWORK_LEN],
            "network",
            network,
        )?;
        let digest = acl.digest();
        if let Some((id, i)) = current {
            if i.digest == digest {
                return Ok(Some(id));
            }
        }
        let id = match current {
            Some((id, _)) => id,
            None => {
                let used: std::collections::HashSet<u32> =
                    self.acl_info()?.keys().filter_map(Result::ok).collect();
                (0..MAX_ACLS)
                    .find(|i| !used.contains(i))
                    .ok_or_else(|| DataplaneError::AclFull(network.to_string()))?
            }
        };
        // Regions for the new tables, clear of every current table (this network's
        // too: packets may be reading them until the slots move).
        let tables = acl.tables();
        let mut used = self.used_regions()?;
        // Free regions may have been read by a program until just now.
        if let Some(t) = self.freed_at.take() {
            std::thread::sleep(REGION_QUIET.saturating_sub(t.elapsed()));
        }
        let mut header = AclHeader {
            default_action: acl.default_action(),
            acl: id,
            ..Default::default()
        };
        const SPACES: [(&str, u32); 3] = [
            ("IPv4 interval", ACL_SPACE),
            ("IPv6 interval", ACL_SPACE),
            ("rule", RULE_SPACE),
        ];
        for (k, t) in tables.iter().enumerate() {
            let (len, nrules) = (t.intervals.len() as u32, t.rules.len() as u32);
            let full = |space: usize, need: u32| DataplaneError::AclSpace {
                network: network.to_string(),
                what: SPACES[space].0,
                need,
                cap: SPACES[space].1,
            };
            let base =
                first_fit(&mut used[k / 2], len, ACL_SPACE).ok_or_else(|| full(k / 2, len))?;
            let rules =
                first_fit(&mut used[2], nrules, RULE_SPACE).ok_or_else(|| full(2, nrules))?;
            header.tables[k] = TableRef {
                base,
                len,
                rules,
                nrules,
            };
        }
        for (k, t) in tables.iter().enumerate() {
            let r = header.tables[k];
            if k < 2 {
                let iv: Vec<IntervalV4> = t
                    .intervals
                    .iter()
                    .map(|&(start, span)| IntervalV4 {
                        start: start as u32,
                        span,
                    })
                    .collect();
                self.iv4.write(r.base, &iv);
            } else {
                let iv: Vec<IntervalV6> = t
                    .intervals
                    .iter()
                    .map(|&(start, span)| IntervalV6 {
                        start: [(start >> 64) as u64, start as u64],
                        span,
                        _pad: 0,
                    })
                    .collect();
                self.iv6.write(r.base, &iv);
            }
            self.rules.write(r.rules, &t.rules);
        }
        // The header not in use (the bpf() call below orders the writes above).
        let index = match current {
            Some((_, i)) if i.header == id * 2 => id * 2 + 1,
            _ => id * 2,
        };
        let mut hdrs: Array<&mut MapData, AclHeader> = Array::try_from(self.map_mut("ACL_HDR"))
            .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
        hdrs.set(index, header, 0)
            .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
        if current.is_none() {
            self.zero_hits(id);
        }
        let mut info = AclInfo {
            digest,
            rules: acl.rules.len() as u32,
            header: index,
            ..Default::default()
        };
        put(&mut info.network, "network", network)?;
        self.acl_info()?
            .insert(id, info, 0)
            .map_err(|e| op("ACL_INFO map")(e.to_string()))?;
        for slot in self.slots_of(network)? {
            self.set_slot_acl(slot, Some(index))?;
        }
        if current.is_some() {
            // The previous version's regions are free from here on.
            self.freed_at = Some(std::time::Instant::now());
        }
        Ok(Some(id))
    }

    /// Drops `network`'s ACL if no attachment uses it.
    pub fn forget_unused_acl(&mut self, network: &str) -> Result<(), DataplaneError> {
        if self.slots_of(network)?.is_empty() {
            self.set_network_acl(network, None)?;
        }
        Ok(())
    }

    /// Forgets ACL `id`: its regions are free once no ACL_INFO entry names them.
    fn drop_acl(&mut self, id: u32) -> Result<(), DataplaneError> {
        let _ = self.acl_info()?.remove(&id);
        self.zero_hits(id);
        Ok(())
    }

    fn zero_hits(&mut self, id: u32) {
        self.hits
            .write(id * ACL_HIT_STRIDE, &vec![0; ACL_HIT_STRIDE as usize]);
    }
}

/// Programs of one slot, loaded but not attached: packets go through them with
/// BPF_PROG_TEST_RUN, with the slot's counters and its network's ACL.
pub struct Probe {
    pub slot: u32,
    inst: Ebpf,
}

impl Probe {
    /// Runs `packet` (an Ethernet frame) `repeat` times through the program of `dir`:
    /// its verdict (TCX_NEXT passes, TCX_DROP drops) and the kernel's mean time per run.
    pub fn run(
        &self,
        dir: u32,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        test_run(&self.inst, PROGRAMS[dir as usize].0, packet, repeat)
    }

    /// As `run`, through the program on the host side of a veth.
    pub fn run_peer(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        test_run(&self.inst, PEER_PROGRAM.0, packet, repeat)
    }
}

/// Runs `packet` `repeat` times through the loaded classifier `name` of `bpf`
/// (BPF_PROG_TEST_RUN): its return value and the kernel's mean time per run.
pub(crate) fn test_run(
    bpf: &Ebpf,
    name: &str,
    packet: &[u8],
    repeat: u32,
) -> Result<(i32, std::time::Duration), DataplaneError> {
    use aya::programs::{TestRun, TestRunOptions};
    let p: &SchedClassifier = bpf
        .program(name)
        .ok_or_else(|| DataplaneError::Load(format!("no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..Default::default()
        })
        .map_err(|e| op(format!("{name}: BPF_PROG_TEST_RUN"))(e.to_string()))?;
    Ok((r.return_value as i32, r.duration))
}

/// One network's ACL as counted in the pins: hits per rule (in NAD order) with each
/// rule's action, then the default's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AclHits {
    pub network: String,
    pub rules: Vec<u64>,
    pub actions: Vec<&'static str>,
    pub default: u64,
    pub default_action: &'static str,
}

fn action_name(a: u32) -> &'static str {
    if a == trellis_ebpf_common::ACT_DENY as u32 {
        "deny"
    } else {
        "allow"
    }
}

/// The map pinned as `name` in `dir`.
fn open_pin(dir: &Path, name: &str) -> Result<MapData, DataplaneError> {
    MapData::from_pin(dir.join(name))
        .map_err(|e| op(format!("reading {}/{name}", dir.display()))(e.to_string()))
}

/// Every network ACL's rule hits, from the pins in `dir`.
pub fn read_acl_hits(dir: &Path) -> Result<Vec<AclHits>, DataplaneError> {
    let open = |name: &str| open_pin(dir, name);
    let info: BpfHashMap<MapData, u32, AclInfo> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(open("ACL_INFO")?))
            .map_err(|e| op("ACL_INFO map")(e.to_string()))?;
    let hdrs: Array<MapData, AclHeader> = Array::try_from(aya::maps::Map::Array(open("ACL_HDR")?))
        .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
    // Rules and hits as memory: an ACL has up to 10,001 counters, not a syscall each.
    let rules: Mapped<AclRule> = Mapped::read_only(&open("ACL_RULES")?, "ACL_RULES", RULE_SPACE)?;
    let hits: Mapped<u64> =
        Mapped::read_only(&open("RULE_HITS")?, "RULE_HITS", MAX_ACLS * ACL_HIT_STRIDE)?;
    let mut out = Vec::new();
    for e in info.iter() {
        let (id, i) = e.map_err(|e| op("ACL_INFO map")(e.to_string()))?;
        let counters = hits.load(id * ACL_HIT_STRIDE, ACL_HIT_STRIDE);
        let h = hdrs
            .get(&i.header, 0)
            .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
        let mut actions = vec!["allow"; i.rules as usize];
        for t in &h.tables {
            for r in rules.read(t.rules, t.nrules) {
                if let Some(a) = actions.get_mut(r.id as usize) {
                    *a = action_name(r.action as u32);
                }
            }
        }
        out.push(AclHits {
            network: get(&i.network),
            rules: counters[..i.rules as usize].to_vec(),
            actions,
            default: counters[ACL_HIT_DEFAULT as usize],
            default_action: action_name(h.default_action),
        });
    }
    out.sort_by(|a, b| a.network.cmp(&b.network));
    Ok(out)
}

/// Every attachment's counters, from the pins in `dir` (no agent needed).
pub fn read_stats(dir: &Path) -> Result<Vec<SlotStats>, DataplaneError> {
    let open = |name: &str| open_pin(dir, name);
    let meta: BpfHashMap<MapData, u32, SlotMeta> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(open("META")?))
            .map_err(|e| op("META map")(e.to_string()))?;
    let stats: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open("STATS")?))
            .map_err(|e| op("STATS map")(e.to_string()))?;
    let mut out = Vec::new();
    for entry in meta.iter() {
        let (slot, m) = entry.map_err(|e| op("META map")(e.to_string()))?;
        let sum = |dir: u32| -> Result<Counters, DataplaneError> {
            let per_cpu = stats
                .get(&(slot * 2 + dir), 0)
                .map_err(|e| op("STATS map")(e.to_string()))?;
            let mut c = Counters::default();
            for v in per_cpu.iter() {
                c.add(v);
            }
            Ok(c)
        };
        out.push(SlotStats {
            slot,
            owner: owner_of(&m),
            ingress: sum(DIR_INGRESS)?.into(),
            egress: sum(DIR_EGRESS)?.into(),
        });
    }
    out.sort_by(|a, b| {
        (&a.owner.namespace, &a.owner.pod, &a.owner.ifname).cmp(&(
            &b.owner.namespace,
            &b.owner.pod,
            &b.owner.ifname,
        ))
    });
    Ok(out)
}
