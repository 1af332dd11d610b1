//! The kernel/userspace interface as the pins keep it: every map the programs declare
//! (name, type, key and value sizes, entries, flags), and the layout version pins of
//! this shape carry. The programs' `#[map(name = ...)]` must say the same (the
//! agent's tests compare its embedded object with `MAPS`); the loader compares pins
//! it would re-adopt with it (`check_layout` in agent/src/dataplane/loader.rs).
//!
//! Changing any map's shape, or what a key or value means, needs a new
//! LAYOUT_VERSION, and a line in `tests::KNOWN` below for the new fingerprint: an
//! agent must never re-adopt pins of another shape.

use crate::*;
use core::mem::size_of;

/// The version of every pinned map's layout (names, sizes, key and value shapes).
/// Pins of another version are not re-adopted: the loader refuses them by name.
/// 2: names held whole (SlotMeta, AclInfo), the host peer in SlotMeta, LAYOUT itself.
/// 3: programs loaded once and attached as tc filters (not TCX links) whose classid
/// names the slot and its generation (GEN), 1,024 ACL ids with hit counters as
/// regions, a first-level index per ACL table, the netns path in SlotMeta.
/// 4: rate limits (POLICE), rate-limit drops in Counters, SLOT_SHAPED.
/// 5: logical networks (LOGICAL): an agent of layout 4 must not run their pods.
/// 6: GEN and SLOT_ACL folded into SLOT, which also says whether POLICE and LOGICAL
/// apply (one lookup per packet for a slot without limits or a logical network).
pub const LAYOUT_VERSION: u32 = 6;

/// Map names, as the programs' `#[map(name = ...)]` give them and the pins are named.
pub mod maps {
    pub const STATS: &str = "STATS";
    pub const META: &str = "META";
    pub const LAYOUT: &str = "LAYOUT";
    pub const SLOT: &str = "SLOT";
    pub const PROBE: &str = "PROBE";
    pub const ACL_HDR: &str = "ACL_HDR";
    pub const ACL_IV4: &str = "ACL_IV4";
    pub const ACL_IV6: &str = "ACL_IV6";
    pub const ACL_IDX: &str = "ACL_IDX";
    pub const ACL_RULES: &str = "ACL_RULES";
    pub const ACL_INFO: &str = "ACL_INFO";
    pub const RULE_HITS: &str = "RULE_HITS";
    pub const POLICE: &str = "POLICE";
    pub const LOGICAL: &str = "LOGICAL";
}

/// bpf_map_type numbers of the kinds the programs use (linux/bpf.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    ProgArray = 3,
    PerCpuArray = 6,
}

/// One map as the kernel creates it from the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    /// Pinned under the agent's bpffs dir and re-adopted by the next start.
    pub pinned: bool,
}

const fn spec<K, V>(name: &'static str, kind: MapKind, max_entries: u32, flags: u32) -> MapSpec {
    MapSpec {
        name,
        kind,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
        max_entries,
        flags,
        pinned: true,
    }
}

/// Every map of trellis-tc.
pub const MAPS: [MapSpec; 14] = [
    // Slot and direction (`stats_index`) -> counters, per CPU.
    spec::<u32, Counters>(maps::STATS, MapKind::PerCpuArray, MAX_SLOTS * 2, 0),
    // Slot -> who it belongs to.
    spec::<u32, SlotMeta>(maps::META, MapKind::Hash, MAX_SLOTS, NO_PREALLOC),
    // Entry 0: LAYOUT_VERSION.
    spec::<u32, u32>(maps::LAYOUT, MapKind::Array, 1, 0),
    spec::<u32, SlotState>(maps::SLOT, MapKind::Array, MAX_SLOTS, 0),
    // Hook -> program, for BPF_PROG_TEST_RUN only; each loader fills its own.
    MapSpec {
        pinned: false,
        ..spec::<u32, u32>(maps::PROBE, MapKind::ProgArray, HOOKS, 0)
    },
    spec::<u32, AclHeader>(maps::ACL_HDR, MapKind::Array, MAX_ACLS * 2, 0),
    spec::<u32, IntervalV4>(maps::ACL_IV4, MapKind::Array, ACL_SPACE, MMAPABLE),
    spec::<u32, IntervalV6>(maps::ACL_IV6, MapKind::Array, ACL_SPACE, MMAPABLE),
    spec::<u32, Bucket>(maps::ACL_IDX, MapKind::Array, IDX_SPACE, MMAPABLE),
    spec::<u32, AclRule>(maps::ACL_RULES, MapKind::Array, RULE_SPACE, MMAPABLE),
    spec::<u32, AclInfo>(maps::ACL_INFO, MapKind::Hash, MAX_ACLS, NO_PREALLOC),
    spec::<u32, u64>(maps::RULE_HITS, MapKind::Array, HIT_SPACE, MMAPABLE),
    // Slot and direction (`stats_index`) -> rate limit.
    spec::<u32, Policer>(maps::POLICE, MapKind::Array, MAX_SLOTS * 2, 0),
    spec::<u32, LogicalNet>(maps::LOGICAL, MapKind::Array, MAX_SLOTS, 0),
];

/// The spec of the map named `name`.
pub fn map_spec(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|m| m.name == name)
}

/// The pinned maps' names.
pub fn pinned_maps() -> impl Iterator<Item = &'static str> {
    MAPS.iter().filter(|m| m.pinned).map(|m| m.name)
}

/// FNV-1a over every map's shape: what `tests::KNOWN` pins to a LAYOUT_VERSION.
pub const fn layout_fingerprint() -> u64 {
    const fn mix(mut h: u64, bytes: &[u8]) -> u64 {
        let mut i = 0;
        while i < bytes.len() {
            h ^= bytes[i] as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        h
    }
    let mut h = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < MAPS.len() {
        let m = &MAPS[i];
        h = mix(h, m.name.as_bytes());
        h = mix(h, &(m.kind as u32).to_le_bytes());
        h = mix(h, &m.key_size.to_le_bytes());
        h = mix(h, &m.value_size.to_le_bytes());
        h = mix(h, &m.max_entries.to_le_bytes());
        h = mix(h, &m.flags.to_le_bytes());
        h = mix(h, &[m.pinned as u8]);
        i += 1;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each layout version and the fingerprint of its maps. Append a line when the
    /// layout changes; never edit one.
    const KNOWN: &[(u32, u64)] = &[(6, 0x1463_f2c9_b9fe_4d42)];

    #[test]
    fn a_changed_map_shape_comes_with_a_new_layout_version() {
        let now = (LAYOUT_VERSION, layout_fingerprint());
        let (version, fingerprint) = *KNOWN.last().unwrap();
        assert!(
            now == (version, fingerprint),
            "the maps' shape is now fingerprint {:#x} at LAYOUT_VERSION {}; the last known \
             is {fingerprint:#x} at version {version}. A changed shape needs a new \
             LAYOUT_VERSION (pins of the old one are then refused, not misread) and a new \
             line in KNOWN",
            now.1,
            now.0,
        );
        for (i, (v, f)) in KNOWN.iter().enumerate() {
            assert!(
                KNOWN[i + 1..].iter().all(|(v2, f2)| v2 > v && f2 != f),
                "KNOWN: versions rise and fingerprints differ ({v}, {f:#x})"
            );
        }
    }

    #[test]
    fn names_are_unique_and_fit_the_kernels_map_name() {
        for (i, m) in MAPS.iter().enumerate() {
            // BPF_OBJ_NAME_LEN 16, with its NUL.
            assert!(m.name.len() < 16, "{}", m.name);
            assert!(MAPS[i + 1..].iter().all(|o| o.name != m.name), "{}", m.name);
        }
    }
}
