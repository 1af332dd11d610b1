//! The eBPF dataplane: the programs of ebpf/programs (embedded at build time),
//! loaded and verified once per agent start and attached to each pod interface as
//! tc filters (see tc.rs for why not TCX) whose classid names the attachment's slot
//! and generation. Maps are pinned under one bpffs dir, so the agent can restart
//! (counters and attachments stay; the maps are re-adopted by name; filters keep the
//! programs they were made with, which share those maps) and `trellis stats` can
//! read everything from the pins alone.

mod acl_space;
mod read;
mod tc;
mod testrun;

pub use read::{live_hooks, read_acl_hits, read_stats, AclHits};

use crate::bandwidth::{Limits, Rate};
use acl_space::Mapped;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray};
use aya::programs::{ProgramFd, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use tc::{Rtnl, Side};
use trellis_ebpf_common::{
    classid, maps, stats_index, uses_police, AclRule, Bucket, Counters, IfKey, IntervalV4,
    IntervalV6, LogicalNet, Policer, SlotMeta, SlotState, ACL_SPACE, DIR_EGRESS, DIR_INGRESS,
    HIT_SPACE, HOOKS, HOOK_EGRESS, HOOK_INGRESS, HOOK_PEER, IDX_SPACE, LAYOUT_VERSION,
    MAX_GENERATION, MAX_SLOTS, POLICE_DROP, POLICE_PACE, POLICE_PEER_QDISC, POLICE_QDISC,
    POLICE_QUEUE, RULE_SPACE, SLOT_CLSACT_PEER, SLOT_CLSACT_POD, SLOT_IFB, SLOT_SHAPED,
    SLOT_SHAPED_PEER, USES_LOGICAL,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/trellis-tc"));

/// The object's program for each hook, in HOOK_* order.
const PROGRAMS: [&str; HOOKS as usize] = ["trellis_ingress", "trellis_egress", "trellis_peer"];
/// The program tests and benchmarks run packets through (BPF_PROG_TEST_RUN).
const PROBE_PROGRAM: &str = "trellis_probe";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{dir} is not on a bpffs (mount one: mount -t bpf bpf /sys/fs/bpf)")]
    NoBpffs { dir: String },
    #[error("the pins in {dir} are layout {found} and this agent's are layout {LAYOUT_VERSION}: they cannot be re-adopted. Remove the directory to start over (rm -r {dir}: counters reset; interfaces keep filters of the old programs, with their old maps, until the agent, restarted, attaches its records' live pods again, replacing them)")]
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
    #[error("attaching to {ifname}: {message}")]
    Attach { ifname: String, message: String },
    #[error("{what}: {message}")]
    Op { what: String, message: String },
    #[error("all {MAX_SLOTS} attachment slots are in use")]
    Full,
    #[error("network {0}: all {max} ACL ids are in use by other networks", max = trellis_ebpf_common::MAX_ACLS)]
    AclFull(String),
    #[error("network {network}: its ACL needs {need} more {what} entries than are free in the shared table space ({cap} in all, the rest held by other networks' ACLs)")]
    AclSpace {
        network: String,
        what: &'static str,
        need: u32,
        cap: u32,
    },
    #[error("network {network}: its ACL needs {need} {what} entries, and the other ACL networks of namespace {namespace} hold {used} of the {share} it may hold ([dataplane] acl_share_per_namespace, of {cap} shared by all)")]
    AclQuota {
        network: String,
        namespace: String,
        what: &'static str,
        need: u64,
        used: u64,
        share: u64,
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
    /// The bandwidth limits the dataplane keeps on it, per direction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress_limit: Option<LimitView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_limit: Option<LimitView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct CountersView {
    pub packets: u64,
    pub bytes: u64,
    /// Dropped by the ACL.
    pub drops: u64,
    /// Dropped by the rate limit.
    pub limited: u64,
    pub limited_bytes: u64,
}

impl From<Counters> for CountersView {
    fn from(c: Counters) -> Self {
        CountersView {
            packets: c.packets,
            bytes: c.bytes,
            drops: c.drops,
            limited: c.limited,
            limited_bytes: c.limited_bytes,
        }
    }
}

/// How an attachment's egress limit is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shaper {
    /// The egress program gives each packet its departure time and an fq root
    /// qdisc holds it until then (earliest departure time).
    Fq,
    /// An HTB root qdisc with one class at the rate (kernels without fq).
    Htb,
}

/// A slot's limit in one direction as POLICE says, and how it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LimitView {
    /// Bits per second and bits.
    pub rate: u64,
    pub burst: u64,
    /// `police` (dropped above the rate), `fq` (paced), `htb` (queued).
    pub by: &'static str,
}

impl LimitView {
    pub(crate) fn of(p: &Policer) -> Option<LimitView> {
        (p.rate != 0).then_some(LimitView {
            rate: p.rate,
            burst: p.burst,
            by: match p.mode {
                POLICE_PACE => "fq",
                POLICE_QDISC => "htb",
                POLICE_QUEUE => "ifb-htb",
                POLICE_PEER_QDISC => "host-htb",
                _ => "police",
            },
        })
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
fn slot_meta(owner: &Owner, netns: &Path) -> Result<SlotMeta, DataplaneError> {
    let mut m = SlotMeta::default();
    put(&mut m.namespace, "namespace", &owner.namespace)?;
    put(&mut m.pod, "pod", &owner.pod)?;
    put(&mut m.network, "network", &owner.network)?;
    put(&mut m.ifname, "interface", &owner.ifname)?;
    put(&mut m.container, "container", &owner.container)?;
    let netns = netns.to_str().ok_or_else(|| DataplaneError::NameTooLong {
        field: "netns path",
        value: netns.display().to_string(),
        len: netns.as_os_str().len(),
        max: 0,
    })?;
    put(&mut m.netns, "netns path", netns)?;
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
pub fn load_classifier(bpf: &mut Ebpf, name: &str) -> Result<(), DataplaneError> {
    classifier(bpf, name)?
        .load()
        .map_err(|e| DataplaneError::Load(format!("{name}: {e}")))
}

fn classifier<'a>(
    bpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    bpf.program_mut(name)
        .ok_or_else(|| DataplaneError::Load(format!("no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))
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

/// The filter name of a slot's stubs (how a filter is known to be this slot's).
fn filter_name(slot: u32) -> String {
    format!("trellis-{slot}")
}

/// The sides of a device a hook's stub is attached to.
const fn side(hook: u32) -> Side {
    if hook == HOOK_EGRESS {
        Side::Egress
    } else {
        Side::Ingress
    }
}

pub struct Dataplane {
    bpf: Ebpf,
    dir: PathBuf,
    /// The object's programs per hook (HOOK_* order), loaded once.
    progs: Vec<ProgramFd>,
    /// Whether the probe program is loaded and its PROBE table filled.
    probe_ready: bool,
    /// Every owned slot's META entry: the agent is its only writer, so lookups by
    /// network and free slots need no walk of the map (one syscall per entry).
    slots: BTreeMap<u32, SlotMeta>,
    /// Where the search for a free slot starts: numbers are handed out in turn.
    next_slot: u32,
    /// A netlink socket in the agent's netns (host sides of veths).
    host: Option<Rtnl>,
    /// The last pod netns worked in: its identity (st_dev, st_ino), a socket there
    /// and its cookie. A pod's interfaces are attached (and detached) one after the
    /// other: one trip into its netns serves them all.
    pod_ns: Option<((u64, u64), Rtnl, u64)>,
    /// The agent's own netns, to ask a pod's netns which nsid it gives it.
    own_netns: std::fs::File,
    /// The ACL table spaces, mapped: IPv4 and IPv6 intervals, first-level buckets,
    /// rules, and rule hit counters.
    iv4: Mapped<IntervalV4>,
    iv6: Mapped<IntervalV6>,
    idx: Mapped<Bucket>,
    rules: Mapped<AclRule>,
    hits: Mapped<u64>,
    /// When table regions were last given up (slots moved off them): they are not
    /// written again until every program that may still be reading them has returned.
    freed_at: Option<std::time::Instant>,
    /// How egress limits are kept: fq where the kernel has it (found out at the
    /// first egress limit), else HTB.
    shaper: Option<Shaper>,
    /// The kernel makes no ifb devices: ingress limits are policed.
    no_ifb: bool,
    /// How ingress limits are kept (`[dataplane] ingress_limit`).
    ingress_limit: crate::bandwidth::IngressLimit,
    /// The part of each shared ACL space (and of the ACL ids) the ACLs of one
    /// namespace may hold (1.0: no limit).
    acl_share: f64,
}

/// What attaching found out about the pod's interface.
struct Found {
    rtnl: Rtnl,
    key: IfKey,
    /// The host side of its veth in the agent's netns (ifindex), if any.
    peer: Option<u32>,
}

/// The identity of the netns at `path` (a bind mount of it, or /proc/PID/ns/net):
/// its nsfs inode.
fn netns_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = crate::netns::open(path)?.metadata()?;
    Ok((m.dev(), m.ino()))
}

impl Dataplane {
    /// Loads the programs, re-adopting maps already pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Dataplane, DataplaneError> {
        check_bpffs(dir)?;
        check_layout(dir)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| op(format!("creating {}", dir.display()))(e.to_string()))?;
        // The programs use no CO-RE relocations: no need for the kernel's BTF, which
        // aya would parse into ~20 MB of the agent's heap.
        let mut bpf = EbpfLoader::new()
            .btf(None)
            .default_map_pin_directory(dir)
            .load(OBJECT)
            .map_err(|e| DataplaneError::Load(e.to_string()))?;
        for name in PINNED_MAPS {
            if bpf.map(name).is_none() {
                return Err(DataplaneError::Load(format!(
                    "the object has no map {name}"
                )));
            }
        }
        // The maps are pinned now: say which layout they are before anything can fail.
        let mut layout: Array<&mut MapData, u32> =
            Array::try_from(bpf.map_mut(maps::LAYOUT).expect("checked"))
                .map_err(|e| op("LAYOUT map")(e.to_string()))?;
        layout
            .set(0, LAYOUT_VERSION, 0)
            .map_err(|e| op("LAYOUT map")(e.to_string()))?;
        let mut progs = Vec::new();
        for name in PROGRAMS {
            load_classifier(&mut bpf, name)?;
            let fd = classifier(&mut bpf, name)?
                .fd()
                .and_then(|fd| fd.try_clone().map_err(Into::into))
                .map_err(|e| DataplaneError::Load(format!("{name}: {e}")))?;
            progs.push(fd);
        }
        let own_netns = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| op("opening the agent's netns")(e.to_string()))?;
        let mut dp = Dataplane {
            iv4: Mapped::new(&bpf, maps::ACL_IV4, ACL_SPACE)?,
            iv6: Mapped::new(&bpf, maps::ACL_IV6, ACL_SPACE)?,
            idx: Mapped::new(&bpf, maps::ACL_IDX, IDX_SPACE)?,
            rules: Mapped::new(&bpf, maps::ACL_RULES, RULE_SPACE)?,
            hits: Mapped::new(&bpf, maps::RULE_HITS, HIT_SPACE)?,
            freed_at: None,
            shaper: None,
            no_ifb: false,
            ingress_limit: Default::default(),
            acl_share: 1.0,
            progs,
            probe_ready: false,
            slots: BTreeMap::new(),
            next_slot: 0,
            host: None,
            pod_ns: None,
            own_netns,
            bpf,
            dir: dir.to_path_buf(),
        };
        let mut slots = BTreeMap::new();
        for e in dp.meta()?.iter() {
            let (slot, m) = e.map_err(|e| op("META map")(e.to_string()))?;
            slots.insert(slot, m);
        }
        dp.next_slot = slots.keys().next_back().map_or(0, |s| (s + 1) % MAX_SLOTS);
        dp.slots = slots;
        Ok(dp)
    }

    fn meta(&mut self) -> Result<BpfHashMap<&mut MapData, u32, SlotMeta>, DataplaneError> {
        BpfHashMap::try_from(self.bpf.map_mut(maps::META).expect("checked at open"))
            .map_err(|e| op("META map")(e.to_string()))
    }

    fn map_mut(&mut self, name: &str) -> &mut aya::maps::Map {
        self.bpf.map_mut(name).expect("checked at open")
    }

    fn slot_states(&mut self) -> Result<Array<&mut MapData, SlotState>, DataplaneError> {
        Array::try_from(self.map_mut(maps::SLOT)).map_err(|e| op("SLOT map")(e.to_string()))
    }

    /// What the programs read first about `slot`.
    fn slot_state(&mut self, slot: u32) -> Result<SlotState, DataplaneError> {
        self.slot_states()?
            .get(&slot, 0)
            .map_err(|e| op("SLOT map")(e.to_string()))
    }

    /// Changes `slot`'s SLOT entry with `f` (only the agent writes it, one request at
    /// a time); the entry as written.
    fn update_slot(
        &mut self,
        slot: u32,
        f: impl FnOnce(&mut SlotState),
    ) -> Result<SlotState, DataplaneError> {
        let mut s = self.slot_state(slot)?;
        f(&mut s);
        self.slot_states()?
            .set(slot, s, 0)
            .map_err(|e| op("SLOT map")(e.to_string()))?;
        Ok(s)
    }

    /// The generation `slot` is at.
    fn generation(&mut self, slot: u32) -> Result<u32, DataplaneError> {
        Ok(self.slot_state(slot)?.generation)
    }

    /// Moves `slot` to its next generation (before its filters are made, and at its
    /// release: every filter of an earlier generation does nothing from then on).
    /// The new generation.
    fn next_generation(&mut self, slot: u32) -> Result<u32, DataplaneError> {
        let s = self.update_slot(slot, |s| {
            s.generation = if s.generation >= MAX_GENERATION {
                1
            } else {
                s.generation + 1
            }
        })?;
        Ok(s.generation)
    }

    /// A slot no attachment holds, after the last one handed out.
    fn free_slot(&mut self) -> Result<u32, DataplaneError> {
        let slot = (0..MAX_SLOTS)
            .map(|i| (self.next_slot + i) % MAX_SLOTS)
            .find(|s| !self.slots.contains_key(s))
            .ok_or(DataplaneError::Full)?;
        self.next_slot = (slot + 1) % MAX_SLOTS;
        Ok(slot)
    }

    /// Records `m` as `slot`'s owner (META and the index).
    fn own(&mut self, slot: u32, m: SlotMeta) -> Result<(), DataplaneError> {
        self.meta()?
            .insert(slot, m, 0)
            .map_err(|e| op("META map")(e.to_string()))?;
        self.slots.insert(slot, m);
        Ok(())
    }

    /// Zeroes the slot's counters.
    fn zero_counters(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| op("counting CPUs")(e.to_string()))?;
        let mut stats: PerCpuArray<&mut MapData, Counters> =
            PerCpuArray::try_from(self.map_mut(maps::STATS))
                .map_err(|e| op("STATS map")(e.to_string()))?;
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let zero =
                PerCpuValues::try_from(vec![Counters::default(); ncpus]).expect("one per CPU");
            stats
                .set(stats_index(slot, dir), zero, 0)
                .map_err(|e| op("zeroing counters")(e.to_string()))?;
        }
        Ok(())
    }

    /// A socket in the netns at `path` and its cookie: the last one's if `path` is
    /// still that netns, else a new one (a thread's trip into it). `keep_socket`
    /// gives it back.
    fn pod_socket(&mut self, path: &Path) -> std::io::Result<(Rtnl, u64)> {
        let id = netns_id(path)?;
        if let Some((last, rtnl, cookie)) = self.pod_ns.take() {
            if last == id {
                return Ok((rtnl, cookie));
            }
        }
        crate::netns::run_in(path, || -> std::io::Result<_> {
            Ok((
                Rtnl::here()?,
                netns_cookie().map_err(std::io::Error::other)?,
            ))
        })?
    }

    /// Keeps `rtnl` (in the netns at `path`, of `cookie`) for the next attachment.
    fn keep_socket(&mut self, path: &Path, rtnl: Rtnl, cookie: u64) {
        if let Ok(id) = netns_id(path) {
            self.pod_ns = Some((id, rtnl, cookie));
        }
    }

    /// Finds `ifname` in the netns at `netns`: a socket there, its key, and the host
    /// side of its veth when that is in the agent's netns (bridge and ptp delegates
    /// put it there; macvlan and VFs have none).
    fn find(&mut self, netns: &Path, ifname: &str) -> Result<Found, DataplaneError> {
        let attach_err = |m: String| DataplaneError::Attach {
            ifname: ifname.to_string(),
            message: m,
        };
        let (rtnl, cookie) = self
            .pod_socket(netns)
            .map_err(|e| attach_err(format!("entering {}: {e}", netns.display())))?;
        let mut found = Found {
            rtnl,
            key: IfKey {
                netns_cookie: cookie,
                ..Default::default()
            },
            peer: None,
        };
        let link = match found.rtnl.link(ifname) {
            Ok(Some(l)) => l,
            Ok(None) => {
                let e = attach_err(format!("no interface {ifname} in {}", netns.display()));
                self.keep_socket(netns, found.rtnl, cookie);
                return Err(e);
            }
            Err(e) => return Err(attach_err(e.to_string())),
        };
        found.key.ifindex = link.index;
        let Some((peer, Some(nsid))) = link.veth_peer else {
            return Ok(found);
        };
        let peer_err = |e: std::io::Error| DataplaneError::Attach {
            ifname: format!("the host side of {ifname}"),
            message: e.to_string(),
        };
        // The peer's netns, as the pod's netns numbers it, must be ours...
        if found.rtnl.nsid_of(&self.own_netns).map_err(peer_err)? != Some(nsid) {
            return Ok(found);
        }
        if self.host.is_none() {
            self.host = Some(Rtnl::here().map_err(peer_err)?);
        }
        let host = self.host.as_mut().expect("just set");
        // ...and the link there must name the pod's end back.
        let back = host.link_by_index(peer).map_err(peer_err)?;
        if back.and_then(|b| b.veth_peer).map(|(i, _)| i) == Some(link.index) {
            found.peer = Some(peer);
        }
        Ok(found)
    }

    /// Attaches the programs to `ifname` in the netns at `netns` (and the egress
    /// check to the host side of its veth when that is in the agent's netns);
    /// returns its slot. On any failure nothing of it is left.
    pub fn attach(&mut self, netns: &Path, owner: &Owner) -> Result<u32, DataplaneError> {
        self.attach_limited(netns, owner, &Limits::default())
    }

    /// `attach` with `limits`: ingress policed by the programs, egress shaped by a
    /// root qdisc on the interface (see `Shaper`).
    pub fn attach_limited(
        &mut self,
        netns: &Path,
        owner: &Owner,
        limits: &Limits,
    ) -> Result<u32, DataplaneError> {
        self.attach_full(netns, owner, limits, None)
    }

    /// `attach_limited` on a logical network: the packets of the interface must
    /// have both addresses in `logical`'s subnets (the programs drop the rest, counted
    /// as drops).
    pub fn attach_full(
        &mut self,
        netns: &Path,
        owner: &Owner,
        limits: &Limits,
        logical: Option<&LogicalNet>,
    ) -> Result<u32, DataplaneError> {
        // Every name fits whole, or nothing is attached.
        let mut meta = slot_meta(owner, netns)?;
        let mut found = self.find(netns, &owner.ifname)?;
        let slot = self.free_slot()?;
        meta.key = found.key;
        meta.peer_ifindex = found.peer.unwrap_or(0);
        // Owned first: from here on, everything made is found (and undone) from META.
        let made = self
            .own(slot, meta)
            .and_then(|()| self.make(slot, &mut meta, &mut found, &owner.network, limits, logical));
        if let Err(e) = &made {
            if let Err(undo) = self.remove(slot, Some(&mut found.rtnl)) {
                tracing::warn!(slot, "undoing a failed attach ({e}): {undo}");
            }
        }
        self.keep_socket(netns, found.rtnl, found.key.netns_cookie);
        made.map(|()| slot)
    }

    /// The parts of an attach after its slot is owned: rules, counters, the slot's
    /// new generation, then the filters (the first packet a filter passes is judged).
    fn make(
        &mut self,
        slot: u32,
        meta: &mut SlotMeta,
        found: &mut Found,
        network: &str,
        limits: &Limits,
        logical: Option<&LogicalNet>,
    ) -> Result<(), DataplaneError> {
        let header = self.acl_header_of(network)?;
        let has_acl = header.is_some() || logical.is_some();
        self.set_slot_acl(slot, header)?;
        self.set_logical(slot, logical.copied())?;
        self.zero_counters(slot)?;
        let class = classid(slot, self.next_generation(slot)?);
        let name = filter_name(slot);
        let ifname = get(&meta.ifname);
        let fail = |ifname: &str, what: &str, e: std::io::Error| DataplaneError::Attach {
            ifname: ifname.to_string(),
            message: format!("{what}: {e}"),
        };
        let queue = self.ingress_limit == crate::bandwidth::IngressLimit::Queue;
        match (limits.ingress, found.peer) {
            // A veth whose host side is ours: an HTB there queues what the pod
            // receives, out of the pod's reach, with no ifb.
            (Some(ingress), Some(peer)) if queue => {
                meta.flags |= SLOT_SHAPED_PEER;
                self.own(slot, *meta)?;
                let host = self.host.as_mut().expect("found a peer with it");
                host.add_root(peer, Some((ingress.bytes_per_sec(), ingress.burst_bytes())))
                    .map_err(|e| {
                        fail(
                            &format!("the host side of {ifname}"),
                            "shaping what the pod receives",
                            e,
                        )
                    })?;
                let mut p = Policer::new(ingress.rate, ingress.burst, POLICE_PEER_QDISC);
                p.ns_per_byte = 0;
                self.set_police(slot, DIR_INGRESS, p)?;
            }
            (Some(ingress), _) => {
                // Owned before it is made: a failure from here on removes it.
                meta.flags |= SLOT_IFB;
                self.own(slot, *meta)?;
                let queued = match self.ingress_limit {
                    crate::bandwidth::IngressLimit::Queue => {
                        self.queue_ingress(&mut found.rtnl, found.key.netns_cookie, slot, ingress)
                    }
                    crate::bandwidth::IngressLimit::Police => {
                        Err(std::io::Error::other("policed by configuration"))
                    }
                };
                let police_anyway =
                    self.no_ifb || self.ingress_limit == crate::bandwidth::IngressLimit::Police;
                let p = match queued {
                    Ok(ifb) => {
                        meta.ifb_ifindex = ifb;
                        self.own(slot, *meta)?;
                        let mut p = Policer::new(ingress.rate, ingress.burst, POLICE_QUEUE);
                        p.ns_per_byte = 0;
                        p.ifindex = ifb;
                        p
                    }
                    Err(e) if police_anyway => {
                        tracing::debug!(slot, "no ifb ({e}): ingress limit policed");
                        Policer::new(ingress.rate, ingress.burst, POLICE_DROP)
                    }
                    Err(e) => return Err(fail(&ifname, "queueing its ingress", e)),
                };
                self.set_police(slot, DIR_INGRESS, p)?;
            }
            (None, _) => self.set_police(slot, DIR_INGRESS, Policer::default())?,
        }
        if let Some(egress) = limits.egress {
            // Owned before it is made: a failure from here on removes it.
            meta.flags |= SLOT_SHAPED;
            self.own(slot, *meta)?;
            let shaper = self
                .shape(&mut found.rtnl, meta.key.ifindex, egress)
                .map_err(|e| fail(&ifname, "shaping its egress", e))?;
            let mode = match shaper {
                Shaper::Fq => POLICE_PACE,
                Shaper::Htb => POLICE_QDISC,
            };
            let mut p = Policer::new(egress.rate, egress.burst, mode);
            if shaper == Shaper::Htb {
                p.ns_per_byte = 0;
            }
            self.set_police(slot, DIR_EGRESS, p)?;
        } else {
            self.set_police(slot, DIR_EGRESS, Policer::default())?;
        }
        if found
            .rtnl
            .add_clsact(meta.key.ifindex)
            .map_err(|e| fail(&ifname, "adding a clsact qdisc", e))?
        {
            meta.flags |= SLOT_CLSACT_POD;
            self.own(slot, *meta)?;
        }
        for hook in [HOOK_INGRESS, HOOK_EGRESS] {
            let prog = self.progs[hook as usize].as_fd();
            found
                .rtnl
                .add_filter(meta.key.ifindex, side(hook), prog, class, &name)
                .map_err(|e| {
                    let what = if e.raw_os_error() == Some(libc::EINVAL) && hook == HOOK_EGRESS {
                        "adding the egress filter (does the interface have an ingress qdisc instead of clsact?)"
                    } else {
                        "adding a filter"
                    };
                    fail(&ifname, what, e)
                })?;
        }
        let Some(peer) = found.peer else {
            return Ok(());
        };
        let host_name = format!("the host side of {ifname}");
        let host = self.host.as_mut().expect("found a peer with it");
        if host
            .add_clsact(peer)
            .map_err(|e| fail(&host_name, "adding a clsact qdisc", e))?
        {
            meta.flags |= SLOT_CLSACT_PEER;
            self.own(slot, *meta)?;
        }
        let prog = self.progs[HOOK_PEER as usize].as_fd();
        let host = self.host.as_mut().expect("found a peer with it");
        match host.add_filter(peer, Side::Ingress, prog, class, &name) {
            Ok(()) => Ok(()),
            // Our priority holds another component's filter (the reference bandwidth
            // plugin's u32 redirect to its ifb): the host side goes without ours, the
            // pod's egress rules are kept at its own interface.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !has_acl => {
                tracing::warn!(slot, ifname, "{host_name} has a filter of another kind at our priority ({e}): its pod's traffic is counted at its own interface only");
                if meta.flags & SLOT_CLSACT_PEER != 0 {
                    let _ = host.del_clsact(peer);
                    meta.flags &= !SLOT_CLSACT_PEER;
                }
                if meta.flags & SLOT_SHAPED_PEER == 0 {
                    meta.peer_ifindex = 0;
                }
                self.own(slot, *meta)
            }
            // With an ACL the host side's check is part of the promise (a pod that
            // removes its own filter is still held to its egress rules).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(fail(
                &host_name,
                "adding the filter that enforces the network's ACL again on the host side (another component holds priority 1 there, such as a chained bandwidth plugin's u32 filter)",
                e,
            )),
            Err(e) => Err(fail(&host_name, "adding a filter", e)),
        }
    }

    /// Detaches the attachment in `slot` only if the slot still belongs to
    /// `container`'s `ifname` (after a reboot or a lost record, the slot number may
    /// be another pod's now). Whether it was detached.
    pub fn detach_owned(
        &mut self,
        slot: u32,
        container: &str,
        ifname: &str,
    ) -> Result<bool, DataplaneError> {
        let mine = self
            .slots
            .get(&slot)
            .is_some_and(|m| get(&m.container) == container && get(&m.ifname) == ifname);
        if mine {
            self.detach(slot)?;
        }
        Ok(mine)
    }

    /// Makes ours the root qdisc of `ifindex` for `egress`: fq if the kernel has it
    /// (tried once per agent), else HTB. Which one.
    fn shape(&mut self, rtnl: &mut Rtnl, ifindex: u32, egress: Rate) -> std::io::Result<Shaper> {
        if self.shaper != Some(Shaper::Htb) {
            match rtnl.add_root(ifindex, None) {
                Ok(()) => {
                    if self.shaper.is_none() {
                        tracing::info!("egress limits: paced by the programs, held by fq (earliest departure time)");
                    }
                    self.shaper = Some(Shaper::Fq);
                    return Ok(Shaper::Fq);
                }
                // No fq in this kernel (ENOENT: unknown qdisc kind).
                Err(e) if self.shaper.is_none() && e.raw_os_error() == Some(libc::ENOENT) => {
                    tracing::info!("egress limits: the kernel has no fq qdisc; shaped by an HTB class per interface");
                    self.shaper = Some(Shaper::Htb);
                }
                Err(e) => return Err(e),
            }
        }
        rtnl.add_root(
            ifindex,
            Some((egress.bytes_per_sec(), egress.burst_bytes())),
        )?;
        Ok(Shaper::Htb)
    }

    /// Makes the ifb device that queues `slot`'s ingress at `rate` (an HTB at its
    /// root) in the netns of `rtnl` (of netns cookie `cookie`); its ifindex. A kernel
    /// without ifb devices is remembered (`no_ifb`): ingress limits are policed there
    /// instead.
    fn queue_ingress(
        &mut self,
        rtnl: &mut Rtnl,
        cookie: u64,
        slot: u32,
        rate: Rate,
    ) -> std::io::Result<u32> {
        let name = ifb_name(slot);
        // Ours that no live slot of this netns owns: left by an agent that died
        // attaching, or by one whose pins are gone (the slot numbers differ now).
        for stale in rtnl.ifbs()? {
            let owner = stale
                .strip_prefix("trl-in-")
                .and_then(|n| n.parse::<u32>().ok());
            let Some(s) = owner else { continue };
            let live = s != slot
                && self
                    .slots
                    .get(&s)
                    .is_some_and(|m| m.flags & SLOT_IFB != 0 && m.key.netns_cookie == cookie);
            if !live {
                let _ = rtnl.del_ifb(&stale);
            }
        }
        let ifb = match rtnl.add_ifb(&name) {
            Ok(i) => i,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                if !self.no_ifb {
                    tracing::info!("ingress limits: the kernel has no ifb devices; policed (dropped above the rate) by the programs");
                }
                self.no_ifb = true;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let queued = rtnl.add_root(ifb, Some((rate.bytes_per_sec(), rate.burst_bytes())));
        if let Err(e) = queued {
            let _ = rtnl.del_ifb(&name);
            return Err(e);
        }
        Ok(ifb)
    }

    /// How ingress limits are kept from now on.
    pub fn set_ingress_limit(&mut self, how: crate::bandwidth::IngressLimit) {
        self.ingress_limit = how;
    }

    /// The part of each shared ACL space one namespace's ACLs may hold.
    pub fn set_acl_share(&mut self, share: f64) {
        self.acl_share = share;
    }

    /// Runs `f` with no namespace share: for a deny-all ACL put in place of one that
    /// could not be (failing closed must not fail).
    pub fn without_share<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let share = std::mem::replace(&mut self.acl_share, 1.0);
        let out = f(self);
        self.acl_share = share;
        out
    }

    /// How egress limits are kept on this node (None: none asked for yet).
    pub fn shaper(&self) -> Option<Shaper> {
        self.shaper
    }

    fn police(&mut self) -> Result<Array<&mut MapData, Policer>, DataplaneError> {
        Array::try_from(self.map_mut(maps::POLICE)).map_err(|e| op("POLICE map")(e.to_string()))
    }

    /// Sets (or with None, clears) `slot`'s logical network; the programs read it
    /// only while SLOT says so.
    fn set_logical(&mut self, slot: u32, l: Option<LogicalNet>) -> Result<(), DataplaneError> {
        if l.is_none() {
            self.update_slot(slot, |s| s.uses &= !USES_LOGICAL)?;
        }
        let mut m: Array<&mut MapData, LogicalNet> =
            Array::try_from(self.map_mut(maps::LOGICAL))
                .map_err(|e| op("LOGICAL map")(e.to_string()))?;
        m.set(slot, l.unwrap_or_default(), 0)
            .map_err(|e| op("LOGICAL map")(e.to_string()))?;
        if l.is_some() {
            self.update_slot(slot, |s| s.uses |= USES_LOGICAL)?;
        }
        Ok(())
    }

    /// Sets `slot`'s POLICE entry in `dir`; the programs read it only while SLOT
    /// says it acts on packets (a token bucket, or an ifb to queue in).
    fn set_police(&mut self, slot: u32, dir: u32, p: Policer) -> Result<(), DataplaneError> {
        let acts = p.ns_per_byte != 0 || (p.mode == POLICE_QUEUE && p.ifindex != 0);
        if !acts {
            self.update_slot(slot, |s| s.uses &= !uses_police(dir))?;
        }
        self.police()?
            .set(stats_index(slot, dir), p, 0)
            .map_err(|e| op("POLICE map")(e.to_string()))?;
        if acts {
            self.update_slot(slot, |s| s.uses |= uses_police(dir))?;
        }
        Ok(())
    }

    /// The limits `slot` is attached with.
    pub fn limits_of(&mut self, slot: u32) -> Result<[Option<LimitView>; 2], DataplaneError> {
        let police = self.police()?;
        let get = |dir| {
            police
                .get(&stats_index(slot, dir), 0)
                .map(|p| LimitView::of(&p))
                .map_err(|e| op("POLICE map")(e.to_string()))
        };
        Ok([get(DIR_INGRESS)?, get(DIR_EGRESS)?])
    }

    /// Takes `slot`'s limits off now, before its delegate's DEL, which may take the
    /// interface back to the host (host-device, VFs) with the qdisc shaping it and
    /// a filter that would redirect into an ifindex of another netns. Only if the
    /// slot is still `container`'s `ifname`. Failures are logged; the slot's removal
    /// tries again.
    pub fn unshape(&mut self, slot: u32, container: &str, ifname: &str) {
        let Some(mut m) = self.slots.get(&slot).copied() else {
            return;
        };
        if m.flags & (SLOT_SHAPED | SLOT_IFB) == 0
            || get(&m.container) != container
            || get(&m.ifname) != ifname
        {
            return;
        }
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            if let Err(e) = self.set_police(slot, dir, Policer::default()) {
                tracing::warn!(slot, "{e}");
            }
        }
        if m.flags & SLOT_SHAPED == 0 {
            return;
        }
        let netns = get(&m.netns);
        if let Ok((mut rtnl, cookie)) = self.pod_socket(Path::new(&netns)) {
            if cookie == m.key.netns_cookie {
                match rtnl.del_root(m.key.ifindex) {
                    Ok(_) => {
                        m.flags &= !SLOT_SHAPED;
                        if let Err(e) = self.own(slot, m) {
                            tracing::warn!(slot, "{e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(slot, netns, "removing the qdisc shaping its egress: {e}")
                    }
                }
            }
            self.keep_socket(Path::new(&netns), rtnl, cookie);
        }
    }

    /// Closes the socket kept in the last pod netns worked in: after a pod's DEL, it
    /// would keep that netns (and what is left in it) alive once the runtime
    /// deletes it.
    pub fn forget_pod_socket(&mut self) {
        self.pod_ns = None;
    }

    /// Detaches and forgets the attachment in `slot`: its filters do nothing from
    /// now on (a new generation), are removed where its interface still is, and its
    /// owner is forgotten. The last attachment of a network takes its ACL with it.
    pub fn detach(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let network = self.slots.get(&slot).map(|m| get(&m.network));
        self.remove(slot, None)?;
        if let Some(network) = network {
            self.forget_unused_acl(&network)?;
        }
        Ok(())
    }

    /// Undoes everything of `slot` (with `pod`, a socket already in its netns).
    fn remove(&mut self, slot: u32, pod: Option<&mut Rtnl>) -> Result<(), DataplaneError> {
        let class = classid(slot, self.generation(slot)?);
        self.next_generation(slot)?;
        if let Some(m) = self.slots.get(&slot).copied() {
            self.remove_filters(class, &m, pod);
        }
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            self.set_police(slot, dir, Policer::default())?;
        }
        self.set_logical(slot, None)?;
        self.set_slot_acl(slot, None)?;
        let _ = self.meta()?.remove(&slot);
        self.slots.remove(&slot);
        Ok(())
    }

    /// Removes the filters of classid `class` (and clsact qdiscs its slot added, once
    /// empty) from its interface, if that is still where META says (same netns cookie
    /// and ifindex), and from the host side of its veth. Failures are logged: the
    /// filters do nothing already.
    fn remove_filters(&mut self, class: u32, m: &SlotMeta, pod: Option<&mut Rtnl>) {
        let slot = class & (MAX_SLOTS - 1);
        let netns = get(&m.netns);
        let mut opened = None;
        let pod = match pod {
            Some(r) => Some(r),
            None if netns.is_empty() => None,
            None => match self.pod_socket(Path::new(&netns)) {
                // The path names another netns now (reused): not ours to touch.
                Ok((r, cookie)) if cookie == m.key.netns_cookie => {
                    Some(&mut opened.insert((r, cookie)).0)
                }
                _ => None,
            },
        };
        // The host side is touched only while the pod's end of the veth still names
        // it: once the pair is gone its host-side qdiscs went with it, and the
        // ifindex may be another pod's veth by now.
        let mut paired = false;
        if let Some(rtnl) = pod {
            let ifindex = m.key.ifindex;
            if m.peer_ifindex != 0 {
                let nsid = rtnl.nsid_of(&self.own_netns).ok().flatten();
                paired = nsid.is_some()
                    && rtnl
                        .link_by_index(ifindex)
                        .ok()
                        .flatten()
                        .and_then(|l| l.veth_peer)
                        == Some((m.peer_ifindex, nsid));
            }
            let ours = m.flags & SLOT_CLSACT_POD != 0;
            if let Err(e) = unfilter(rtnl, ifindex, &[Side::Ingress, Side::Egress], class, ours) {
                tracing::warn!(slot, netns, ifindex, "removing the slot's filters: {e}");
            }
            if m.flags & SLOT_SHAPED != 0 {
                if let Err(e) = rtnl.del_root(ifindex) {
                    tracing::warn!(
                        slot,
                        netns,
                        ifindex,
                        "removing the qdisc shaping its egress: {e}"
                    );
                }
            }
            // By name: an agent that died making it may not have recorded its index.
            if m.flags & SLOT_IFB != 0 {
                if let Err(e) = rtnl.del_ifb(&ifb_name(slot)) {
                    tracing::warn!(
                        slot,
                        netns,
                        "removing the ifb device queueing its ingress: {e}"
                    );
                }
            }
        }
        if let Some((rtnl, cookie)) = opened {
            self.keep_socket(Path::new(&netns), rtnl, cookie);
        }
        if paired {
            if self.host.is_none() {
                self.host = Rtnl::here().ok();
            }
            if let Some(host) = self.host.as_mut() {
                let ours = m.flags & SLOT_CLSACT_PEER != 0;
                if let Err(e) = unfilter(host, m.peer_ifindex, &[Side::Ingress], class, ours) {
                    tracing::warn!(
                        slot,
                        ifindex = m.peer_ifindex,
                        "removing the slot's filter from the host side of its veth: {e}"
                    );
                }
                if m.flags & SLOT_SHAPED_PEER != 0 {
                    if let Err(e) = host.del_root(m.peer_ifindex) {
                        tracing::warn!(
                            slot,
                            ifindex = m.peer_ifindex,
                            "removing the qdisc shaping what its pod receives: {e}"
                        );
                    }
                }
            }
        }
    }

    /// Every slot and who it belongs to.
    pub fn slots(&mut self) -> Result<Vec<(u32, Owner)>, DataplaneError> {
        Ok(self.slots.iter().map(|(s, m)| (*s, owner_of(m))).collect())
    }

    /// Slots whose owner is on `network`.
    pub fn slots_of(&mut self, network: &str) -> Result<Vec<u32>, DataplaneError> {
        Ok(self
            .slots
            .iter()
            .filter(|(_, m)| get(&m.network) == network)
            .map(|(s, _)| *s)
            .collect())
    }

    /// Networks that have live attachments.
    pub fn networks(&mut self) -> Result<Vec<String>, DataplaneError> {
        let set: std::collections::BTreeSet<String> =
            self.slots.values().map(|m| get(&m.network)).collect();
        Ok(set.into_iter().collect())
    }

    /// Removes what older layouts pinned per link (`links/`; tc filters need none).
    pub fn remove_orphan_pins(&mut self) -> Result<Vec<String>, DataplaneError> {
        let dir = self.dir.join("links");
        let mut removed = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if std::fs::remove_file(e.path()).is_ok() {
                    removed.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        Ok(removed)
    }

    /// Points `slot` at ACL header `header` (None: no ACL).
    fn set_slot_acl(&mut self, slot: u32, header: Option<u32>) -> Result<(), DataplaneError> {
        self.update_slot(slot, |s| s.acl = header.map_or(0, |h| h + 1))
            .map(|_| ())
    }

    /// The ACL header `slot` points at, + 1 (0: none).
    fn slot_acl(&mut self, slot: u32) -> Result<u32, DataplaneError> {
        Ok(self.slot_state(slot)?.acl)
    }

    /// The kernel memory (memlock) each shared program holds, in HOOK_* order.
    pub fn program_memlock(&self) -> Result<Vec<u64>, DataplaneError> {
        self.progs
            .iter()
            .map(|p| {
                let fd = p.as_fd().as_raw_fd();
                std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("memlock:"))
                            .and_then(|v| v.trim().parse().ok())
                    })
                    .ok_or_else(|| op("reading a program's fdinfo")("no memlock".into()))
            })
            .collect()
    }

    /// The kernel memory (memlock) the pinned maps hold, in all.
    pub fn map_memlock(&self) -> Result<u64, DataplaneError> {
        let mut total = 0;
        for name in PINNED_MAPS {
            let Some(m) = self.bpf.map(name) else {
                continue;
            };
            let fd = match m {
                aya::maps::Map::Array(d)
                | aya::maps::Map::HashMap(d)
                | aya::maps::Map::PerCpuArray(d) => d.fd().as_fd().as_raw_fd(),
                _ => continue,
            };
            total += std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("memlock:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
        }
        Ok(total)
    }

    /// Loads the probe program and points its PROBE table at the hooks' programs.
    fn ready_probe(&mut self) -> Result<ProgramFd, DataplaneError> {
        if !self.probe_ready {
            load_classifier(&mut self.bpf, PROBE_PROGRAM)?;
            let progs: Vec<ProgramFd> = self
                .progs
                .iter()
                .map(|p| p.try_clone())
                .collect::<Result<_, _>>()
                .map_err(|e| op("duplicating a program fd")(e.to_string()))?;
            let mut table: ProgramArray<&mut MapData> =
                ProgramArray::try_from(self.map_mut("PROBE"))
                    .map_err(|e| op("PROBE map")(e.to_string()))?;
            for (hook, p) in progs.iter().enumerate() {
                table
                    .set(hook as u32, p, 0)
                    .map_err(|e| op("PROBE map")(e.to_string()))?;
            }
            self.probe_ready = true;
        }
        classifier(&mut self.bpf, PROBE_PROGRAM)?
            .fd()
            .and_then(|fd| fd.try_clone().map_err(Into::into))
            .map_err(|e| DataplaneError::Load(format!("{PROBE_PROGRAM}: {e}")))
    }

    /// A slot for `owner` attached nowhere, to run packets through its programs
    /// with BPF_PROG_TEST_RUN (tests, benchmarks). `detach` frees it.
    pub fn probe(&mut self, owner: &Owner) -> Result<Probe, DataplaneError> {
        self.probe_policed(owner, &Limits::default())
    }

    /// As `probe`, with `limits` kept by the programs' token bucket in both
    /// directions (as `ingress_limit = "police"` keeps ingress).
    pub fn probe_policed(
        &mut self,
        owner: &Owner,
        limits: &Limits,
    ) -> Result<Probe, DataplaneError> {
        self.probe_with(owner, limits, None)
    }

    /// As `probe_policed`, on a logical network.
    pub fn probe_with(
        &mut self,
        owner: &Owner,
        limits: &Limits,
        logical: Option<LogicalNet>,
    ) -> Result<Probe, DataplaneError> {
        let meta = slot_meta(owner, Path::new(""))?;
        let slot = self.free_slot()?;
        self.own(slot, meta)?;
        let made = (|| {
            let header = self.acl_header_of(&owner.network)?;
            self.set_slot_acl(slot, header)?;
            self.zero_counters(slot)?;
            for (dir, limit) in [(DIR_INGRESS, limits.ingress), (DIR_EGRESS, limits.egress)] {
                let p = limit.map(|r| Policer::new(r.rate, r.burst, POLICE_DROP));
                self.set_police(slot, dir, p.unwrap_or_default())?;
            }
            self.set_logical(slot, logical)?;
            let class = classid(slot, self.next_generation(slot)?);
            Ok(Probe {
                slot,
                class,
                program: self.ready_probe()?,
            })
        })();
        if made.is_err() {
            let _ = self.remove(slot, None);
        }
        made
    }
}

/// Removes our filter of classid `class` from each of `sides` of `ifindex`, then the
/// clsact qdisc if we added it (`ours`) and no filter of anyone else is left on it.
fn unfilter(
    rtnl: &mut Rtnl,
    ifindex: u32,
    sides: &[Side],
    class: u32,
    ours: bool,
) -> std::io::Result<()> {
    let mut ours_found = Vec::new();
    let mut others = 0;
    // Both sides are looked at: the qdisc holds both, whichever we used.
    for side in [Side::Ingress, Side::Egress] {
        let filters = rtnl.filters(ifindex, side)?;
        if sides.contains(&side) && filters.contains(&Some(class)) {
            ours_found.push(side);
        }
        others += filters.iter().filter(|c| **c != Some(class)).count();
    }
    // Only where our filters still are: the ifindex may name another device now.
    if ours && others == 0 && !ours_found.is_empty() {
        // The qdisc takes our filters with it: one request.
        return rtnl.del_clsact(ifindex);
    }
    for side in ours_found {
        rtnl.del_filter(ifindex, side)?;
    }
    Ok(())
}

/// One slot's programs as its filters would run them, through BPF_PROG_TEST_RUN,
/// with the slot's counters and its network's ACL.
pub struct Probe {
    pub slot: u32,
    class: u32,
    program: ProgramFd,
}

impl Probe {
    /// Runs `packet` (an Ethernet frame) `repeat` times through the program of `dir`:
    /// its verdict (TCX_NEXT passes, TCX_DROP drops) and the kernel's mean time per
    /// run (the probe's tail call into the program included).
    pub fn run(
        &self,
        dir: u32,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        self.run_hook(dir, packet, repeat)
    }

    /// As `run`, through the program on the host side of a veth.
    pub fn run_peer(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        self.run_hook(HOOK_PEER, packet, repeat)
    }

    /// As `run`, through the probe alone (its tail call finds no program): what the
    /// probe itself costs, to read the other figures by.
    pub fn run_probe_only(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        self.run_hook(HOOKS, packet, repeat)
    }

    fn run_hook(
        &self,
        hook: u32,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        testrun::test_run(
            self.program.as_fd(),
            packet,
            repeat,
            Some(&[self.class, hook]),
        )
        .map_err(|e| op("BPF_PROG_TEST_RUN")(e.to_string()))
    }
}

/// Runs `packet` `repeat` times through the loaded classifier `name` of `bpf`
/// (BPF_PROG_TEST_RUN): its return value and the kernel's mean time per run.
pub fn test_run(
    bpf: &Ebpf,
    name: &str,
    packet: &[u8],
    repeat: u32,
) -> Result<(i32, std::time::Duration), DataplaneError> {
    let p: &SchedClassifier = bpf
        .program(name)
        .ok_or_else(|| DataplaneError::Load(format!("no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
    let fd = p
        .fd()
        .map_err(|e| DataplaneError::Load(format!("{name}: {e}")))?;
    testrun::test_run(fd.as_fd(), packet, repeat, None)
        .map_err(|e| op(format!("{name}: BPF_PROG_TEST_RUN"))(e.to_string()))
}

/// The maps the programs pin (a dir with any of them holds pins to re-adopt).
const PINNED_MAPS: [&str; 13] = [
    maps::POLICE,
    maps::LOGICAL,
    maps::STATS,
    maps::META,
    maps::LAYOUT,
    maps::SLOT,
    maps::ACL_HDR,
    maps::ACL_IV4,
    maps::ACL_IV6,
    maps::ACL_IDX,
    maps::ACL_RULES,
    maps::ACL_INFO,
    maps::RULE_HITS,
];

/// The device at the bottom of `name` in the calling thread's netns (following
/// macvlan and ipvlan devices down to what they are on; an altname resolves to its
/// device), and whether it is a bridge. None: no such device.
pub fn root_device(name: &str) -> std::io::Result<Option<(String, bool)>> {
    let mut rtnl = Rtnl::here()?;
    let Some(mut link) = rtnl.link(name)? else {
        return Ok(None);
    };
    // A chain of stacked devices is short; the bound keeps a loop out.
    for _ in 0..8 {
        let Some(lower) = link.lower else { break };
        match rtnl.link_by_index(lower)? {
            Some(l) => link = l,
            None => break,
        }
    }
    Ok(Some((link.name, link.bridge)))
}

/// The name of the ifb device queueing `slot`'s ingress, in its pod's netns.
pub fn ifb_name(slot: u32) -> String {
    format!("trl-in-{slot}")
}

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
