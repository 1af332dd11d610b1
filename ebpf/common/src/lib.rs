//! Map keys and values, defined once for the eBPF programs (no_std) and userspace.
#![no_std]

/// Attachments (pod interfaces) the programs can account for at once.
pub const MAX_SLOTS: u32 = 16384;

pub const DIR_INGRESS: u32 = 0;
pub const DIR_EGRESS: u32 = 1;

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
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.drops += o.drops;
    }
}

/// Who a slot belongs to, kept in a pinned map so `trellis stats` can name every
/// counter from the pins alone. Strings are NUL-padded UTF-8.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotMeta {
    pub key: IfKey,
    pub namespace: [u8; 64],
    pub pod: [u8; 64],
    pub network: [u8; 128],
    pub ifname: [u8; 16],
    pub container: [u8; 80],
}

impl Default for SlotMeta {
    fn default() -> Self {
        SlotMeta {
            key: IfKey::default(),
            namespace: [0; 64],
            pod: [0; 64],
            network: [0; 128],
            ifname: [0; 16],
            container: [0; 80],
        }
    }
}

/// Networks with an ACL on one node at once (each holds its rule hit counters).
pub const MAX_ACLS: u32 = 64;
/// Rules in one network's ACL.
pub const MAX_ACL_RULES: u32 = 10_000;
/// Rules one CIDR may have per direction (the program scans them in order).
pub const MAX_RULES_PER_CIDR: u32 = 32;
/// Address intervals a table can hold: every prefix splits at most one interval in
/// three, so n prefixes make at most 2n + 1.
pub const ACL_INTERVALS: usize = 2 * MAX_ACL_RULES as usize + 2;
/// Binary search steps over ACL_INTERVALS (2^15 > 20,002).
pub const ACL_SEARCH_STEPS: u32 = 15;
/// Per ACL: a hit counter per rule, then one for the default action.
pub const ACL_HIT_STRIDE: u32 = MAX_ACL_RULES + 1;

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

/// Key of the ACL tables: `acl * 2 + direction`.
pub fn acl_key(acl: u32, dir: u32) -> u32 {
    acl * 2 + dir
}

/// One network's rules for one address family and direction, compiled by the agent
/// into sorted, disjoint address intervals: interval i starts at `starts[i]` and runs
/// to the next start; `spans[i]` says which rules apply. A lookup is a binary search
/// (15 steps at most) instead of walking a trie bit by bit. The whole table is one
/// hash map value, so replacing it is atomic for the programs (RCU).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AclTableV4 {
    pub len: u32,
    pub default_action: u32,
    pub starts: [u32; ACL_INTERVALS],
    pub spans: [Span; ACL_INTERVALS],
    pub rules: [AclRule; MAX_ACL_RULES as usize],
}

/// As AclTableV4; each start is an IPv6 address as (high, low) 64-bit halves.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AclTableV6 {
    pub len: u32,
    pub default_action: u32,
    pub starts: [[u64; 2]; ACL_INTERVALS],
    pub spans: [Span; ACL_INTERVALS],
    pub rules: [AclRule; MAX_ACL_RULES as usize],
}

/// Which network an ACL id belongs to (pinned, so a restarted agent and `trellis
/// stats` can name it), and a digest of its rules (to see whether a NAD changed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclInfo {
    pub network: [u8; 128],
    pub digest: u64,
    pub rules: u32,
    pub _pad: u32,
}

impl Default for AclInfo {
    fn default() -> Self {
        AclInfo {
            network: [0; 128],
            digest: 0,
            rules: 0,
            _pad: 0,
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
    // SAFETY: three u64s.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: an IfKey and byte arrays, no padding.
    unsafe impl aya::Pod for super::SlotMeta {}
    // SAFETY: integers and arrays of them; the layouts have no implicit padding
    // (sizes checked in the agent's tests).
    unsafe impl aya::Pod for super::AclTableV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AclTableV6 {}
    // SAFETY: bytes and integers, explicit _pad.
    unsafe impl aya::Pod for super::AclInfo {}
    // SAFETY: two u8 and three u16, no padding.
    unsafe impl aya::Pod for super::AclRule {}
}
