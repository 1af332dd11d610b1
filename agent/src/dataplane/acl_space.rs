//! The ACL table spaces: shared BPF_F_MMAPABLE arrays (intervals per family,
//! first-level buckets, rules, hit counters) of which each ACL header holds regions.
//! An update writes new regions and the header not in use, then moves the slots to
//! it; regions given up are written again only after every program that may still
//! be reading them has returned.

use super::{get, op, put, Dataplane, DataplaneError};
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::Ebpf;
use std::os::fd::AsFd;
use trellis_ebpf_common::{
    maps, AclHeader, AclInfo, IntervalV4, IntervalV6, TableRef, ACL_SPACE, HIT_SPACE, IDX_SPACE,
    MAX_ACLS, RULE_SPACE,
};

/// Longer than any program run (a TC program is not preempted and runs for
/// microseconds): after this, nothing reads a region the slots moved off.
const REGION_QUIET: std::time::Duration = std::time::Duration::from_millis(5);

/// A BPF_F_MMAPABLE array map whose regions are written and read as memory (the
/// programs read the same pages), not one syscall per entry. Only the pages of the
/// region at hand are mapped, for the one operation: mapped whole for the agent's life
/// the tables (~27 MiB) would count in its RSS.
pub(super) struct Mapped<T> {
    fd: std::os::fd::OwnedFd,
    len: usize,
    prot: nix::sys::mman::ProtFlags,
    name: &'static str,
    _entries: std::marker::PhantomData<T>,
}

impl<T: Copy> Mapped<T> {
    pub(super) fn new(
        bpf: &Ebpf,
        name: &'static str,
        len: u32,
    ) -> Result<Mapped<T>, DataplaneError> {
        let map = match bpf.map(name) {
            Some(aya::maps::Map::Array(d)) => d,
            _ => return Err(DataplaneError::Load(format!("no array map {name}"))),
        };
        use nix::sys::mman::ProtFlags;
        Self::of(map, name, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE)
    }

    /// A pinned map opened by `trellis stats`, read only.
    pub(super) fn read_only(
        map: &MapData,
        name: &'static str,
        len: u32,
    ) -> Result<Mapped<T>, DataplaneError> {
        Self::of(map, name, len, nix::sys::mman::ProtFlags::PROT_READ)
    }

    fn of(
        map: &MapData,
        name: &'static str,
        len: u32,
        prot: nix::sys::mman::ProtFlags,
    ) -> Result<Mapped<T>, DataplaneError> {
        // Array entries are 8-byte aligned; ours are multiples of 8.
        assert_eq!(std::mem::size_of::<T>() % 8, 0);
        let fd = map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| op(format!("mapping {name}"))(e.to_string()))?;
        Ok(Mapped {
            fd,
            len: len as usize,
            prot,
            name,
            _entries: std::marker::PhantomData,
        })
    }

    /// Runs `f` on entries `at..at + n` (clamped to the map), mapped for the call.
    fn window<R>(
        &self,
        at: usize,
        n: usize,
        prot: nix::sys::mman::ProtFlags,
        f: impl FnOnce(*mut T, usize) -> R,
    ) -> Result<R, DataplaneError> {
        let end = (at + n).min(self.len);
        let at = at.min(end);
        if at == end {
            return Ok(f(std::ptr::NonNull::dangling().as_ptr(), 0));
        }
        let page = page_size();
        let size = std::mem::size_of::<T>();
        let first = at * size / page * page;
        let bytes = (end * size).next_multiple_of(page) - first;
        let length = std::num::NonZeroUsize::new(bytes).expect("a region has entries");
        // SAFETY: a shared mapping of the map's own pages (BPF_F_MMAPABLE) at a page
        // offset inside the map, unmapped below; nothing else in this process maps
        // them for writing.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                length,
                prot,
                nix::sys::mman::MapFlags::MAP_SHARED,
                self.fd.as_fd(),
                first as i64,
            )
        }
        .map_err(|e| op(format!("mapping {}", self.name))(e.to_string()))?;
        // SAFETY: `at * size - first` is inside the mapping (both page-rounded).
        let entries = unsafe { (ptr.as_ptr() as *mut u8).add(at * size - first) } as *mut T;
        let r = f(entries, end - at);
        // SAFETY: our own mapping of `bytes`, not used after this.
        let _ = unsafe { nix::sys::mman::munmap(ptr, bytes) };
        Ok(r)
    }

    /// Entries `at..at + n` (clamped to the map), copied out.
    pub(super) fn read(&self, at: u32, n: u32) -> Result<Vec<T>, DataplaneError> {
        self.window(
            at as usize,
            n as usize,
            nix::sys::mman::ProtFlags::PROT_READ,
            |p, n| {
                // SAFETY: `n` entries mapped at `p`; plain data written only by the agent
                // (torn reads of a region being rewritten only misname a rule once).
                unsafe { std::slice::from_raw_parts(p, n) }.to_vec()
            },
        )
    }

    fn write(&mut self, at: u32, items: &[T]) -> Result<(), DataplaneError> {
        debug_assert!(self.prot.contains(nix::sys::mman::ProtFlags::PROT_WRITE));
        assert!(
            at as usize + items.len() <= self.len,
            "region within the map"
        );
        self.window(at as usize, items.len(), self.prot, |p, n| {
            debug_assert_eq!(n, items.len());
            // SAFETY: `n` entries mapped writable at `p`; T is plain data.
            unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), p, n) }
        })
    }
}

impl Mapped<u64> {
    /// Counters the programs are still adding to, each read atomically.
    pub(super) fn load(&self, at: u32, n: u32) -> Result<Vec<u64>, DataplaneError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        self.window(
            at as usize,
            n as usize,
            nix::sys::mman::ProtFlags::PROT_READ,
            |p, n| {
                (0..n)
                    .map(|i| {
                        // SAFETY: in the mapping, 8-byte aligned, and the kernel only ever
                        // changes these with atomic adds.
                        unsafe { AtomicU64::from_ptr(p.add(i)) }.load(Ordering::Relaxed)
                    })
                    .collect()
            },
        )
    }
}

/// The kernel's page size (4 KiB here; 16 or 64 KiB on some arm64 kernels): map
/// offsets must be multiples of it.
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf(3) reads a constant.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => 4096,
    })
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

/// The spaces a header's regions are in, in `used_regions` order: (name, capacity).
const SPACES: [(&str, u32); 5] = [
    ("IPv4 interval", ACL_SPACE),
    ("IPv6 interval", ACL_SPACE),
    ("rule", RULE_SPACE),
    ("first-level index", IDX_SPACE),
    ("rule hit counter", HIT_SPACE),
];

impl Dataplane {
    fn acl_info(&mut self) -> Result<BpfHashMap<&mut MapData, u32, AclInfo>, DataplaneError> {
        BpfHashMap::try_from(self.map_mut(maps::ACL_INFO))
            .map_err(|e| op("ACL_INFO map")(e.to_string()))
    }

    fn headers(&mut self) -> Result<Array<&mut MapData, AclHeader>, DataplaneError> {
        Array::try_from(self.map_mut(maps::ACL_HDR)).map_err(|e| op("ACL_HDR map")(e.to_string()))
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

    /// The ACL header `network`'s slots point at, if it has an ACL.
    pub(super) fn acl_header_of(&mut self, network: &str) -> Result<Option<u32>, DataplaneError> {
        Ok(self.acl_entry(network)?.map(|(_, i)| i.header))
    }

    /// The ACL id and digest `network` has in the maps, if any.
    pub fn acl_of(&mut self, network: &str) -> Result<Option<(u32, u64)>, DataplaneError> {
        Ok(self.acl_entry(network)?.map(|(id, i)| (id, i.digest)))
    }

    /// The regions every ACL's current header holds, per space (SPACES order).
    fn used_regions(&mut self) -> Result<[Vec<(u32, u32)>; 5], DataplaneError> {
        let infos: Vec<AclInfo> = self
            .acl_info()?
            .iter()
            .map(|e| {
                e.map(|(_, i)| i)
                    .map_err(|e| op("ACL_INFO map")(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let hdrs = self.headers()?;
        let mut used: [Vec<(u32, u32)>; 5] = Default::default();
        for i in infos {
            let h = hdrs
                .get(&i.header, 0)
                .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
            for (k, t) in h.tables.iter().enumerate() {
                used[k / 2].push((t.base, t.len));
                used[2].push((t.rules, t.nrules));
                used[3].push((t.idx, (1 << t.bits) + 1));
            }
            used[4].push((h.hits, h.nhits));
        }
        Ok(used)
    }

    /// Fails if `network`'s ACL would take its namespace past its share of a shared
    /// space or of the ACL ids (`acl_share`). The cluster network (no namespace) is
    /// not held to one.
    fn check_share(
        &mut self,
        network: &str,
        acl: &crate::acl::Acl,
        tables: &[crate::acl::Table],
    ) -> Result<(), DataplaneError> {
        let Some((namespace, _)) = network.split_once('/') else {
            return Ok(());
        };
        if self.acl_share >= 1.0 {
            return Ok(());
        }
        let prefix = format!("{namespace}/");
        let infos: Vec<AclInfo> = self
            .acl_info()?
            .iter()
            .filter_map(Result::ok)
            .map(|(_, i)| i)
            .filter(|i| {
                let n = get(&i.network);
                n.starts_with(&prefix) && n != network
            })
            .collect();
        let hdrs = self.headers()?;
        let mut used = [0u64; 6];
        for i in &infos {
            let h = hdrs
                .get(&i.header, 0)
                .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
            for (k, t) in h.tables.iter().enumerate() {
                used[k / 2] += t.len as u64;
                used[2] += t.nrules as u64;
                used[3] += (1u64 << t.bits) + 1;
            }
            used[4] += h.nhits as u64;
        }
        used[5] = infos.len() as u64;
        let mut need = [0u64; 6];
        for (k, t) in tables.iter().enumerate() {
            need[k / 2] += t.intervals.len() as u64;
            need[2] += t.rules.len() as u64;
            need[3] += t.index(if k < 2 { 32 } else { 128 }).buckets.len() as u64;
        }
        need[4] = acl.rules.len() as u64 + 1;
        need[5] = 1;
        let caps: Vec<(&'static str, u32)> = SPACES
            .iter()
            .copied()
            .chain([("ACL id", MAX_ACLS)])
            .collect();
        for (k, (what, cap)) in caps.into_iter().enumerate() {
            let share = (cap as f64 * self.acl_share) as u64;
            if used[k] + need[k] > share {
                return Err(DataplaneError::AclQuota {
                    network: network.to_string(),
                    namespace: namespace.to_string(),
                    what,
                    need: need[k],
                    used: used[k],
                    share,
                    cap,
                });
            }
        }
        Ok(())
    }

    /// Makes `network`'s rules `acl` for every attachment of it, live: the new tables
    /// go into free regions and a header not in use, then each slot is pointed at
    /// that header (one u32 write each); nothing is detached, and a packet sees the
    /// old rules or the new, never a mix. Rule hit counters carry over by rule
    /// number. None removes the network's ACL. Returns the network's ACL id.
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
        let old_header = match current {
            Some((_, i)) => Some(
                self.headers()?
                    .get(&i.header, 0)
                    .map_err(|e| op("ACL_HDR map")(e.to_string()))?,
            ),
            None => None,
        };
        // Regions for the new tables, clear of every current table (this network's
        // too: packets may be reading them until the slots move).
        let tables = acl.tables();
        self.check_share(network, acl, &tables)?;
        let mut used = self.used_regions()?;
        // Free regions may have been read by a program until just now.
        if let Some(t) = self.freed_at.take() {
            std::thread::sleep(REGION_QUIET.saturating_sub(t.elapsed()));
        }
        let full = |space: usize, need: u32| DataplaneError::AclSpace {
            network: network.to_string(),
            what: SPACES[space].0,
            need,
            cap: SPACES[space].1,
        };
        let mut fit = |space: usize, need: u32| {
            first_fit(&mut used[space], need, SPACES[space].1).ok_or_else(|| full(space, need))
        };
        let nhits = acl.rules.len() as u32 + 1;
        // The same rule count keeps its counters where they are.
        let hits = match old_header {
            Some(h) if h.nhits == nhits => h.hits,
            _ => fit(4, nhits)?,
        };
        let mut header = AclHeader {
            default_action: acl.default_action(),
            acl: id,
            hits,
            nhits,
            ..Default::default()
        };
        let mut indexes = Vec::new();
        for (k, t) in tables.iter().enumerate() {
            let index = t.index(if k < 2 { 32 } else { 128 });
            let (len, nrules) = (t.intervals.len() as u32, t.rules.len() as u32);
            header.tables[k] = TableRef {
                base: fit(k / 2, len)?,
                len,
                rules: fit(2, nrules)?,
                nrules,
                idx: fit(3, index.buckets.len() as u32)?,
                bits: index.bits,
                shift: index.shift,
                _pad: 0,
                lo: [(index.lo >> 64) as u64, index.lo as u64],
            };
            indexes.push(index);
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
                self.iv4.write(r.base, &iv)?;
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
                self.iv6.write(r.base, &iv)?;
            }
            self.rules.write(r.rules, &t.rules)?;
            self.idx.write(r.idx, &indexes[k].buckets)?;
        }
        if old_header.is_none_or(|h| h.hits != hits) {
            // A new region: the old one's counts by rule number, the default's last.
            let mut counts = vec![0u64; nhits as usize];
            if let Some(h) = old_header {
                let old = self.hits.load(h.hits, h.nhits)?;
                if let Some((default, rules)) = old.split_last() {
                    let n = rules.len().min(nhits as usize - 1);
                    counts[..n].copy_from_slice(&rules[..n]);
                    counts[nhits as usize - 1] = *default;
                }
            }
            self.hits.write(hits, &counts)?;
        }
        // The header not in use (the bpf() call below orders the writes above).
        let index = match current {
            Some((_, i)) if i.header == id * 2 => id * 2 + 1,
            _ => id * 2,
        };
        self.headers()?
            .set(index, header, 0)
            .map_err(|e| op("ACL_HDR map")(e.to_string()))?;
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
        if self.slots_of(network)?.is_empty() && self.acl_entry(network)?.is_some() {
            self.set_network_acl(network, None)?;
        }
        Ok(())
    }

    /// Forgets ACL `id`: its regions are free once no ACL_INFO entry names them.
    fn drop_acl(&mut self, id: u32) -> Result<(), DataplaneError> {
        let _ = self.acl_info()?.remove(&id);
        Ok(())
    }

    /// ACLs of networks with no attachment left (a DEL that raced an update, an
    /// agent killed mid-way): dropped, their ids and table space freed. Their networks.
    /// Points every slot at its network's current ACL header (or at none), as a
    /// whole update would have: an agent killed part way through moving a
    /// network's slots to a new header leaves some on the old one, whose regions
    /// count as free. At start-up, before any request. How many were moved.
    pub fn repoint_slots(&mut self) -> Result<usize, DataplaneError> {
        let owned: Vec<(u32, String)> = self
            .slots
            .iter()
            .map(|(s, m)| (*s, get(&m.network)))
            .collect();
        let mut moved = 0;
        for (slot, network) in owned {
            let want = self.acl_header_of(&network)?.map_or(0, |h| h + 1);
            let now = self.slot_acl(slot)?;
            if now != want {
                self.set_slot_acl(slot, want.checked_sub(1))?;
                moved += 1;
            }
        }
        if moved > 0 {
            self.freed_at = Some(std::time::Instant::now());
        }
        Ok(moved)
    }

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
}
