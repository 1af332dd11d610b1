//! Map keys and values, defined once for the eBPF programs (no_std) and userspace.
#![cfg_attr(not(test), no_std)]

mod layout;
pub use layout::*;

/// Attachments (pod interfaces) the programs can account for at once.
pub const MAX_SLOTS: u32 = 16384;

/// BPF_F_NO_PREALLOC: hash map entries are allocated as written (userspace writes
/// them, one per attachment), not all at load.
pub const NO_PREALLOC: u32 = 1;

/// BPF_F_MMAPABLE: arrays the agent writes a region at a time through a mapping, not
/// one syscall per entry.
pub const MMAPABLE: u32 = 1 << 10;

/// Field sizes of the names kept in the maps: each holds the longest legal name
/// whole (a longer one is refused, never cut). Namespace: a DNS label (63); pod: a
/// DNS subdomain (253); network: `namespace/name` of a NAD (63 + 1 + 253) or the
/// cluster network's conf name; interface: IFNAMSIZ - 1; container: the CNI
/// container ID (the agent takes up to 250 bytes, its record's file name).
pub const NAMESPACE_LEN: usize = 64;
pub const POD_LEN: usize = 256;
pub const NETWORK_LEN: usize = 320;
pub const IFNAME_LEN: usize = 16;
pub const CONTAINER_LEN: usize = 256;

pub const DIR_INGRESS: u32 = 0;
pub const DIR_EGRESS: u32 = 1;

/// The hooks an attachment can have, each a program of the object: the pod
/// interface's ingress and egress, and the ingress of the host side of its veth
/// (where the pod's egress rules are enforced again).
pub const HOOK_INGRESS: u32 = 0;
pub const HOOK_EGRESS: u32 = 1;
pub const HOOK_PEER: u32 = 2;
pub const HOOKS: u32 = 3;

/// Bits of a filter's classid that hold its slot (MAX_SLOTS = 2^14); the rest hold
/// the slot's generation when the filter was made.
pub const SLOT_BITS: u32 = 14;
const _: () = assert!(MAX_SLOTS == 1 << SLOT_BITS);

/// The classid of a slot's tc filters: the shared programs read it as
/// `__sk_buff.tc_classid` (cls_bpf sets it from the filter before running the
/// program), so one loaded program serves every interface. A filter counts only
/// while its generation is the slot's current one (SLOT): a filter left behind
/// anywhere is inert once its slot is freed or handed to another attachment.
pub const fn classid(slot: u32, generation: u32) -> u32 {
    (generation << SLOT_BITS) | slot
}

/// A classid's slot and generation.
pub const fn slot_of(classid: u32) -> (u32, u32) {
    (classid & (MAX_SLOTS - 1), classid >> SLOT_BITS)
}

/// Generations run from 1 to this and wrap (0 is never current: a classid of 0 is
/// no trellis filter).
pub const MAX_GENERATION: u32 = u32::MAX >> SLOT_BITS;

/// The STATS entry of a slot's counters in direction `dir`.
pub const fn stats_index(slot: u32, dir: u32) -> u32 {
    slot * 2 + dir
}

/// What every packet reads first about its slot (SLOT entry): whether the filter
/// running is current, the ACL, and which of the slot's other entries apply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotState {
    /// A filter whose classid carries another generation (left behind by a freed
    /// slot) does nothing.
    pub generation: u32,
    /// The network's current ACL header (ACL_HDR index) + 1; 0: no ACL. A NAD that
    /// gains, changes or loses an ACL moves live slots from one header to the next.
    pub acl: u32,
    /// USES_* bits: which of POLICE (per direction) and LOGICAL the programs read.
    /// Userspace sets a bit after writing the entry and clears it before clearing it.
    pub uses: u32,
    pub _pad: u32,
}

/// SlotState::uses: the POLICE entry of direction `dir` (`1 << dir`) acts on packets
/// (a token bucket, or a queue to redirect to)...
pub const fn uses_police(dir: u32) -> u32 {
    1 << dir
}
/// ... the LOGICAL entry holds the slot's logical network.
pub const USES_LOGICAL: u32 = 4;

/// Longest netns path a slot keeps (where its filters are, to remove them).
pub const NETNS_LEN: usize = 256;

/// Which attachment a packet belongs to: the interface's netns cookie and ifindex
/// (an ifindex alone repeats across pod namespaces).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IfKey {
    pub netns_cookie: u64,
    pub ifindex: u32,
    pub _pad: u32,
}

/// Per slot and direction (index `slot * 2 + dir`), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Passed.
    pub packets: u64,
    pub bytes: u64,
    /// Dropped by the ACL.
    pub drops: u64,
    /// Dropped by the rate limit (POLICE).
    pub limited: u64,
    pub limited_bytes: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.drops += o.drops;
        self.limited += o.limited;
        self.limited_bytes += o.limited_bytes;
    }
}

/// A slot's rate limit in one direction (POLICE entry `stats_index(slot, dir)`): a
/// token bucket kept as one time (GCRA), so that CPUs share it with one
/// compare-and-exchange. The bucket is full at `tat` and earlier; a packet of `len`
/// bytes costs `len * ns_per_byte >> POLICE_SHIFT` ns of it and passes if the
/// bucket then runs at most `burst_ns` ahead of now (or if it was full: a packet
/// bigger than the burst, a GSO one, passes alone and is paid back after).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policer {
    /// When the bucket is full again (ns, CLOCK_MONOTONIC); written by the programs.
    pub tat: u64,
    /// ns per byte at the rate, fixed point; 0: no limit in this direction.
    pub ns_per_byte: u64,
    /// The burst as time at the rate.
    pub burst_ns: u64,
    /// The limit as given: bits per second and bits (what `trellis stats` shows).
    pub rate: u64,
    pub burst: u64,
    /// POLICE_DROP, POLICE_PACE, POLICE_QDISC or POLICE_QUEUE.
    pub mode: u32,
    /// POLICE_QUEUE: the ifb device (in the interface's netns) packets go to.
    pub ifindex: u32,
}

/// Subnets of one logical network a slot may hold, per family.
pub const LOGICAL_PREFIXES: usize = 4;

/// A slot's logical network (LOGICAL entry): the only addresses its packets may
/// have at either end (n4 = n6 = 0: no logical network). IPv4 as (network, mask),
/// IPv6 as (network hi, lo, mask hi, lo), host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogicalNet {
    pub n4: u32,
    pub n6: u32,
    pub v4: [[u32; 2]; LOGICAL_PREFIXES],
    pub v6: [[u64; 4]; LOGICAL_PREFIXES],
}

/// Fractional bits of Policer::ns_per_byte.
pub const POLICE_SHIFT: u32 = 20;
/// Packets over the limit are dropped (ingress, and egress where no qdisc shapes).
pub const POLICE_DROP: u32 = 0;
/// Packets over the limit are given a departure time (skb->tstamp) for the fq
/// qdisc to hold them until (earliest departure time); dropped only past
/// POLICE_HORIZON_NS ahead.
pub const POLICE_PACE: u32 = 1;
pub const POLICE_HORIZON_NS: u64 = 2_000_000_000;
/// The limit is a qdisc's (an HTB class): the entry only says what it is
/// (ns_per_byte 0, the programs do nothing).
pub const POLICE_QDISC: u32 = 2;
/// Ingress packets are redirected to an ifb device (`ifindex`) whose HTB qdisc
/// queues them at the limit, then hands them back to the interface (tc skipped).
pub const POLICE_QUEUE: u32 = 3;
/// The limit is an HTB on the host side of the pod's veth (what the pod receives);
/// the entry only says what it is.
pub const POLICE_PEER_QDISC: u32 = 4;

/// Rates a Policer takes (bits per second): below the lowest, `len * ns_per_byte`
/// could overflow for the largest packet (BIG TCP, 512 KiB); above the highest,
/// ns_per_byte would keep too few significant bits.
pub const POLICE_MIN_RATE: u64 = 1_000;
pub const POLICE_MAX_RATE: u64 = 1 << 40;
/// The largest burst (bits): the reference bandwidth plugin's (4 GiB in bytes).
pub const POLICE_MAX_BURST: u64 = (u32::MAX as u64) * 8;

impl Policer {
    /// The policer for `rate` bits/s and `burst` bits (in the ranges above).
    #[cfg(not(target_arch = "bpf"))]
    pub const fn new(rate: u64, burst: u64, mode: u32) -> Policer {
        let bytes_per_sec = rate / 8;
        let bytes_per_sec = if bytes_per_sec == 0 { 1 } else { bytes_per_sec };
        Policer {
            tat: 0,
            ns_per_byte: ((1_000_000_000u128 << POLICE_SHIFT) / bytes_per_sec as u128) as u64,
            burst_ns: ((burst / 8) as u128 * 1_000_000_000u128 / bytes_per_sec as u128) as u64,
            rate,
            burst,
            mode,
            ifindex: 0,
        }
    }

    /// What a packet of `len` bytes costs (ns).
    #[inline(always)]
    pub const fn cost(&self, len: u32) -> u64 {
        (len as u64 * self.ns_per_byte) >> POLICE_SHIFT
    }
}

/// Who a slot belongs to, kept in a pinned map so `trellis stats` can name every
/// counter from the pins alone, and a DEL detaches only the slot it owns. Strings
/// are UTF-8, NUL-padded (a name that fills its field has no NUL).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotMeta {
    pub key: IfKey,
    /// The host side of the pod's veth, where egress rules are enforced again (0:
    /// none, e.g. macvlan or a VF).
    pub peer_ifindex: u32,
    /// SLOT_CLSACT_* bits: which clsact qdiscs the agent added (and removes with
    /// the slot's filters when no other filter is left on them).
    pub flags: u32,
    pub namespace: [u8; NAMESPACE_LEN],
    pub pod: [u8; POD_LEN],
    pub network: [u8; NETWORK_LEN],
    pub ifname: [u8; IFNAME_LEN],
    pub container: [u8; CONTAINER_LEN],
    /// The pod's netns as the runtime named it (bind mount or /proc path).
    pub netns: [u8; NETNS_LEN],
    /// SLOT_IFB: the ifb device queueing the interface's ingress.
    pub ifb_ifindex: u32,
    pub _pad: u32,
}

/// SlotMeta::flags: the agent added the clsact qdisc of the pod interface / of the
/// host side of its veth.
pub const SLOT_CLSACT_POD: u32 = 1;
pub const SLOT_CLSACT_PEER: u32 = 2;
/// ... and the root qdisc (HTB or fq) that shapes the pod interface's egress.
pub const SLOT_SHAPED: u32 = 4;
/// ... and the ifb device (SlotMeta::ifb_ifindex) queueing its ingress.
pub const SLOT_IFB: u32 = 8;
/// ... and the root qdisc (HTB) of the host side of its veth, which shapes what the
/// pod receives.
pub const SLOT_SHAPED_PEER: u32 = 16;

impl Default for SlotMeta {
    fn default() -> Self {
        SlotMeta {
            key: IfKey::default(),
            peer_ifindex: 0,
            flags: 0,
            namespace: [0; NAMESPACE_LEN],
            pod: [0; POD_LEN],
            network: [0; NETWORK_LEN],
            ifname: [0; IFNAME_LEN],
            container: [0; CONTAINER_LEN],
            netns: [0; NETNS_LEN],
            ifb_ifindex: 0,
            _pad: 0,
        }
    }
}

/// Networks with an ACL on one node at once.
pub const MAX_ACLS: u32 = 1024;
/// Rules in one network's ACL.
pub const MAX_ACL_RULES: u32 = 10_000;
/// Rules one CIDR may have per direction (the program scans them in order).
pub const MAX_RULES_PER_CIDR: u32 = 32;
/// Address intervals one table can have: every prefix splits at most one interval in
/// three, so n prefixes make at most 2n + 1.
pub const ACL_INTERVALS: usize = 2 * MAX_ACL_RULES as usize + 1;
/// Binary search steps over ACL_INTERVALS (2^15 > 20,001): the bound the verifier
/// sees; the first-level index leaves one or two of them for most addresses.
pub const ACL_SEARCH_STEPS: u32 = 15;
/// Largest first-level index of one table: 2^16 buckets (+1 entry).
pub const ACL_INDEX_MAX_BITS: u32 = 16;
/// A decision no rule made (a packet the program could not parse): no hit counted.
pub const ACL_HIT_NONE: u32 = u32::MAX;

pub const ACT_ALLOW: u8 = 0;
pub const ACT_DENY: u8 = 1;
/// Protocol 0 in a rule: any protocol.
pub const PROTO_ANY: u8 = 0;

/// One rule as the program checks it: protocol (0 = any) and destination port range
/// (0-0 = any port), its action, and its place in the NAD (for hit counters).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclRule {
    pub proto: u8,
    pub action: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    pub id: u16,
}

/// The rules of the most specific CIDR covering an address interval: `count` rules
/// from `first` (0 = no CIDR covers it; the default applies).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub first: u16,
    pub count: u16,
}

/// Interval entries each family's table space holds, shared by all ACLs; a table is
/// a region of it. 262,144 x 8 bytes (IPv4) and x 24 bytes (IPv6).
pub const ACL_SPACE: u32 = 262_144;
/// Rule entries in the shared rule space (a rule on both directions takes two).
pub const RULE_SPACE: u32 = 262_144;
/// One first-level bucket: the intervals (from the table's base, both inclusive) an
/// address in it can be in; a binary search of them finds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub first: u32,
    pub last: u32,
}

/// First-level buckets, shared: a table of n >= 2 intervals has 2^bits <= n - 1
/// buckets plus the last (n at most), one of 1 interval has 2; so this holds both
/// families' interval spaces whole plus every header's one-interval tables.
pub const IDX_SPACE: u32 = 2 * ACL_SPACE + 8 * MAX_ACLS;
/// Rule hit counters, shared: an ACL of n rules takes n + 1 (the last is its
/// default's), and n is at most the rule entries it holds.
pub const HIT_SPACE: u32 = RULE_SPACE + MAX_ACLS;

/// One address interval of an IPv4 table: from `start` to the next entry's start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntervalV4 {
    pub start: u32,
    pub span: Span,
}

/// As IntervalV4; the start is an IPv6 address as (high, low) 64-bit halves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntervalV6 {
    pub start: [u64; 2],
    pub span: Span,
    pub _pad: u32,
}

/// Where one table (family and direction) of an ACL lives: `len` intervals from
/// `base` in its family's interval space, its rules from `rules` in the rule space,
/// and its first-level index: `2^bits + 1` buckets from `idx` in ACL_IDX. Bucket b
/// (below the last) covers the addresses from `lo + (b << shift)` to the next
/// bucket's; the last covers every address after. An address below `lo` (the
/// table's second start) is in interval 0. `lo` is an address as (high, low) 64-bit
/// halves (IPv4: the low half).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableRef {
    pub base: u32,
    pub len: u32,
    pub rules: u32,
    pub nrules: u32,
    pub idx: u32,
    pub bits: u32,
    pub shift: u32,
    pub _pad: u32,
    pub lo: [u64; 2],
}

/// Table index in AclHeader::tables: `family * 2 + direction` (family 0 = IPv4).
pub fn table_index(v6: bool, dir: u32) -> usize {
    (v6 as usize) * 2 + dir as usize
}

/// One version of a network's ACL: its four tables (sorted, disjoint address
/// intervals; interval i runs to the next start and its span says which rules apply)
/// and default. Two headers per ACL id (`id * 2 + version`): an update writes the
/// tables and the header not in use, then points the slots at it, one u32 each.
/// A lookup is one first-level index read and a binary search of the few intervals
/// it leaves, array entries the verifier inlines: no hashing, no trie walk. Rule
/// `r`'s hits are counted at `hits + r` in RULE_HITS, the default's at
/// `hits + nhits - 1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclHeader {
    pub tables: [TableRef; 4],
    pub default_action: u32,
    pub acl: u32,
    pub hits: u32,
    pub nhits: u32,
}

/// Which network an ACL id belongs to (pinned, so a restarted agent and `trellis
/// stats` can name it), and a digest of its rules (to see whether a NAD changed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclInfo {
    pub network: [u8; NETWORK_LEN],
    pub digest: u64,
    pub rules: u32,
    /// The ACL_HDR entry in use.
    pub header: u32,
}

impl Default for AclInfo {
    fn default() -> Self {
        AclInfo {
            network: [0; NETWORK_LEN],
            digest: 0,
            rules: 0,
            header: 0,
        }
    }
}

/// TCX verdicts (include/uapi/linux/bpf.h `enum tcx_action_base`).
pub const TCX_NEXT: i32 = -1;
pub const TCX_PASS: i32 = 0;
pub const TCX_DROP: i32 = 2;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data with no padding holes that matter (explicit _pad).
    unsafe impl aya::Pod for super::IfKey {}
    // SAFETY: five u64s.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: four u32s.
    unsafe impl aya::Pod for super::SlotState {}
    // SAFETY: u64s and two u32s, no padding.
    unsafe impl aya::Pod for super::Policer {}
    // SAFETY: u32s then u64s, 8-aligned, no padding.
    unsafe impl aya::Pod for super::LogicalNet {}
    // SAFETY: an IfKey and byte arrays, no padding.
    unsafe impl aya::Pod for super::SlotMeta {}
    // SAFETY: integers and arrays of them, no implicit padding (explicit _pad).
    unsafe impl aya::Pod for super::IntervalV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IntervalV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TableRef {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AclHeader {}
    // SAFETY: bytes and integers, explicit _pad.
    unsafe impl aya::Pod for super::AclInfo {}
    // SAFETY: two u32.
    unsafe impl aya::Pod for super::Bucket {}
    // SAFETY: two u8 and three u16, no padding.
    unsafe impl aya::Pod for super::AclRule {}
}
