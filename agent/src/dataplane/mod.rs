//! The eBPF dataplane: the programs of ebpf/programs (embedded at build time),
//! loaded and verified once per agent start and attached to each pod interface as
//! tc filters (see tc.rs for why not TCX) whose classid names the attachment's slot
//! and generation. Maps are pinned under one bpffs dir, so the agent can restart
//! (counters and attachments stay; the maps are re-adopted by name; filters keep the
//! programs they were made with, which share those maps) and `trellis stats` can
//! read everything from the pins alone.

mod acl_space;
mod attach;
mod limits;
mod loader;
mod probe;
mod read;
mod slots;
mod tc;
mod testrun;

pub use attach::root_device;
pub use limits::ifb_name;
pub use loader::{check_bpffs, load_classifier};
pub use probe::{test_run, Probe};
pub use read::{live_hooks, occupancy, read_acl_hits, read_stats, AclHits, Occupancy};

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
    classid, maps, pinned_maps, stats_index, uses_police, AclRule, Bucket, Counters, IfKey,
    IntervalV4, IntervalV6, LogicalNet, Policer, SlotMeta, SlotState, ACL_SPACE, DIR_EGRESS,
    DIR_INGRESS, HIT_SPACE, HOOKS, HOOK_EGRESS, HOOK_INGRESS, HOOK_PEER, IDX_SPACE, LAYOUT_VERSION,
    MAPS, MAX_GENERATION, MAX_SLOTS, POLICE_DROP, POLICE_PACE, POLICE_PEER_QDISC, POLICE_QDISC,
    POLICE_QUEUE, RULE_SPACE, SLOT_CLSACT_PEER, SLOT_CLSACT_POD, SLOT_IFB, SLOT_SHAPED,
    SLOT_SHAPED_PEER, USES_LOGICAL,
};

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
