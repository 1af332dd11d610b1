//! Reading the pins without the agent: `trellis stats` and the metrics endpoint.

use super::acl_space::Mapped;
use super::{get, op, owner_of, DataplaneError, LimitView, SlotStats};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use std::path::Path;
use trellis_ebpf_common::{
    maps, stats_index, AclHeader, AclInfo, AclRule, Counters, Policer, SlotMeta, DIR_EGRESS,
    DIR_INGRESS, HIT_SPACE, RULE_SPACE,
};

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
        BpfHashMap::try_from(aya::maps::Map::HashMap(open(maps::ACL_INFO)?))
            .map_err(|e| op("ACL_INFO map")(e.to_string()))?;
    let hdrs: Array<MapData, AclHeader> =
        Array::try_from(aya::maps::Map::Array(open(maps::ACL_HDR)?))
            .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
    // Rules and hits as memory: an ACL has up to 10,001 counters, not a syscall each.
    let rules: Mapped<AclRule> =
        Mapped::read_only(&open(maps::ACL_RULES)?, maps::ACL_RULES, RULE_SPACE)?;
    let hits: Mapped<u64> = Mapped::read_only(&open(maps::RULE_HITS)?, maps::RULE_HITS, HIT_SPACE)?;
    let mut out = Vec::new();
    for e in info.iter() {
        let (_, i) = e.map_err(|e| op("ACL_INFO map")(e.to_string()))?;
        let h = hdrs
            .get(&i.header, 0)
            .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
        let counters = hits.load(h.hits, h.nhits)?;
        let Some((&default, rule_hits)) = counters.split_last() else {
            continue;
        };
        let mut actions = vec!["allow"; i.rules as usize];
        for t in &h.tables {
            for r in rules.read(t.rules, t.nrules)? {
                if let Some(a) = actions.get_mut(r.id as usize) {
                    *a = action_name(r.action as u32);
                }
            }
        }
        out.push(AclHits {
            network: get(&i.network),
            rules: rule_hits[..(i.rules as usize).min(rule_hits.len())].to_vec(),
            actions,
            default,
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
        BpfHashMap::try_from(aya::maps::Map::HashMap(open(maps::META)?))
            .map_err(|e| op("META map")(e.to_string()))?;
    let stats: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(maps::STATS)?))
            .map_err(|e| op("STATS map")(e.to_string()))?;
    let police: Array<MapData, Policer> =
        Array::try_from(aya::maps::Map::Array(open(maps::POLICE)?))
            .map_err(|e| op("POLICE map")(e.to_string()))?;
    let limit = |slot: u32, dir: u32| {
        police
            .get(&stats_index(slot, dir), 0)
            .ok()
            .and_then(|p| LimitView::of(&p))
    };
    let mut out = Vec::new();
    for entry in meta.iter() {
        let (slot, m) = entry.map_err(|e| op("META map")(e.to_string()))?;
        let sum = |dir: u32| -> Result<Counters, DataplaneError> {
            let per_cpu = stats
                .get(&stats_index(slot, dir), 0)
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
            ingress_limit: limit(slot, DIR_INGRESS),
            egress_limit: limit(slot, DIR_EGRESS),
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

/// How many hooks the slots in the pins of `dir` have: two per attached interface,
/// and one on the host side of a veth whose peer is in the agent's netns.
pub fn live_hooks(dir: &Path) -> Result<usize, DataplaneError> {
    let meta: BpfHashMap<MapData, u32, SlotMeta> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(open_pin(dir, maps::META)?))
            .map_err(|e| op("META map")(e.to_string()))?;
    let mut n = 0;
    for e in meta.iter() {
        let (_, m) = e.map_err(|e| op("META map")(e.to_string()))?;
        n += if m.peer_ifindex != 0 { 3 } else { 2 };
    }
    Ok(n)
}

/// What the pins in `dir` hold for attachments: slots named in META, ACL ids in
/// ACL_INFO, and SLOT entries that still point at an ACL or use a policer or a
/// logical network while META names no owner for them. All 0 on a node with no
/// attachment; the leak checks of the endurance suite read it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Occupancy {
    pub slots: usize,
    pub acl_ids: usize,
    pub orphan_slot_states: usize,
}

pub fn occupancy(dir: &Path) -> Result<Occupancy, DataplaneError> {
    let meta: BpfHashMap<MapData, u32, SlotMeta> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(open_pin(dir, maps::META)?))
            .map_err(|e| op("META map")(e.to_string()))?;
    let mut owned = std::collections::HashSet::new();
    for e in meta.iter() {
        let (slot, _) = e.map_err(|e| op("META map")(e.to_string()))?;
        owned.insert(slot);
    }
    let info: BpfHashMap<MapData, u32, AclInfo> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(open_pin(dir, maps::ACL_INFO)?))
            .map_err(|e| op("ACL_INFO map")(e.to_string()))?;
    let acl_ids = info.keys().filter(Result::is_ok).count();
    let states: Array<MapData, trellis_ebpf_common::SlotState> =
        Array::try_from(aya::maps::Map::Array(open_pin(dir, maps::SLOT)?))
            .map_err(|e| op("SLOT map")(e.to_string()))?;
    let mut orphan_slot_states = 0;
    for slot in 0..states.len() {
        let s = states
            .get(&slot, 0)
            .map_err(|e| op("SLOT map")(e.to_string()))?;
        if (s.acl != 0 || s.uses != 0) && !owned.contains(&slot) {
            orphan_slot_states += 1;
        }
    }
    Ok(Occupancy {
        slots: owned.len(),
        acl_ids,
        orphan_slot_states,
    })
}
