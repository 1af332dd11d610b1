//! Bandwidth limits and logical networks kept per slot: shaping, ingress queues,
//! policers.

use super::*;

/// The name of the ifb device queueing `slot`'s ingress, in its pod's netns.
pub fn ifb_name(slot: u32) -> String {
    format!("trl-in-{slot}")
}

impl Dataplane {
    /// Makes ours the root qdisc of `ifindex` for `egress`: fq if the kernel has it
    /// (tried once per agent), else HTB. Which one.
    pub(super) fn shape(
        &mut self,
        rtnl: &mut Rtnl,
        ifindex: u32,
        egress: Rate,
    ) -> std::io::Result<Shaper> {
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
    pub(super) fn queue_ingress(
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

    /// How egress limits are kept on this node (None: none asked for yet).
    pub fn shaper(&self) -> Option<Shaper> {
        self.shaper
    }

    pub(super) fn police(&mut self) -> Result<Array<&mut MapData, Policer>, DataplaneError> {
        Array::try_from(self.map_mut(maps::POLICE)).map_err(|e| op("POLICE map")(e.to_string()))
    }

    /// Sets (or with None, clears) `slot`'s logical network; the programs read it
    /// only while SLOT says so.
    pub(super) fn set_logical(
        &mut self,
        slot: u32,
        l: Option<LogicalNet>,
    ) -> Result<(), DataplaneError> {
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
    pub(super) fn set_police(
        &mut self,
        slot: u32,
        dir: u32,
        p: Policer,
    ) -> Result<(), DataplaneError> {
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
}
