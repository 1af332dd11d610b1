//! Slots: one per attached interface, with its owner, generation, counters and ACL.

use super::*;

impl Dataplane {
    pub(super) fn meta(
        &mut self,
    ) -> Result<BpfHashMap<&mut MapData, u32, SlotMeta>, DataplaneError> {
        BpfHashMap::try_from(self.bpf.map_mut(maps::META).expect("checked at open"))
            .map_err(|e| op("META map")(e.to_string()))
    }

    pub(super) fn map_mut(&mut self, name: &str) -> &mut aya::maps::Map {
        self.bpf.map_mut(name).expect("checked at open")
    }

    pub(super) fn slot_states(&mut self) -> Result<Array<&mut MapData, SlotState>, DataplaneError> {
        Array::try_from(self.map_mut(maps::SLOT)).map_err(|e| op("SLOT map")(e.to_string()))
    }

    /// What the programs read first about `slot`.
    pub(super) fn slot_state(&mut self, slot: u32) -> Result<SlotState, DataplaneError> {
        self.slot_states()?
            .get(&slot, 0)
            .map_err(|e| op("SLOT map")(e.to_string()))
    }

    /// Changes `slot`'s SLOT entry with `f` (only the agent writes it, one request at
    /// a time); the entry as written.
    pub(super) fn update_slot(
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
    pub(super) fn generation(&mut self, slot: u32) -> Result<u32, DataplaneError> {
        Ok(self.slot_state(slot)?.generation)
    }

    /// Moves `slot` to its next generation (before its filters are made, and at its
    /// release: every filter of an earlier generation does nothing from then on).
    /// The new generation.
    pub(super) fn next_generation(&mut self, slot: u32) -> Result<u32, DataplaneError> {
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
    pub(super) fn free_slot(&mut self) -> Result<u32, DataplaneError> {
        let slot = (0..MAX_SLOTS)
            .map(|i| (self.next_slot + i) % MAX_SLOTS)
            .find(|s| !self.slots.contains_key(s))
            .ok_or(DataplaneError::Full)?;
        self.next_slot = (slot + 1) % MAX_SLOTS;
        Ok(slot)
    }

    /// Records `m` as `slot`'s owner (META and the index).
    pub(super) fn own(&mut self, slot: u32, m: SlotMeta) -> Result<(), DataplaneError> {
        self.meta()?
            .insert(slot, m, 0)
            .map_err(|e| op("META map")(e.to_string()))?;
        self.slots.insert(slot, m);
        Ok(())
    }

    /// Zeroes the slot's counters.
    pub(super) fn zero_counters(&mut self, slot: u32) -> Result<(), DataplaneError> {
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

    /// Points `slot` at ACL header `header` (None: no ACL).
    pub(super) fn set_slot_acl(
        &mut self,
        slot: u32,
        header: Option<u32>,
    ) -> Result<(), DataplaneError> {
        self.update_slot(slot, |s| s.acl = header.map_or(0, |h| h + 1))
            .map(|_| ())
    }

    /// The ACL header `slot` points at, + 1 (0: none).
    pub(super) fn slot_acl(&mut self, slot: u32) -> Result<u32, DataplaneError> {
        Ok(self.slot_state(slot)?.acl)
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
}
