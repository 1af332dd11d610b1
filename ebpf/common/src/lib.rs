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
}
