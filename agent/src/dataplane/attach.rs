//! Attaching the programs to a pod interface (tc filters whose classid names the slot)
//! and detaching them.

use super::*;

/// The netns cookie (SO_NETNS_COOKIE) of the calling thread's namespace.
pub(super) fn netns_cookie() -> Result<u64, String> {
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
pub(super) fn filter_name(slot: u32) -> String {
    format!("trellis-{slot}")
}

/// The sides of a device a hook's stub is attached to.
pub(super) const fn side(hook: u32) -> Side {
    if hook == HOOK_EGRESS {
        Side::Egress
    } else {
        Side::Ingress
    }
}

/// The identity of the netns at `path` (a bind mount of it, or /proc/PID/ns/net):
/// its nsfs inode.
pub(super) fn netns_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = crate::netns::open(path)?.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Removes our filter of classid `class` from each of `sides` of `ifindex`, then the
/// clsact qdisc if we added it (`ours`) and no filter of anyone else is left on it.
pub(super) fn unfilter(
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

impl Dataplane {
    /// A socket in the netns at `path` and its cookie: the last one's if `path` is
    /// still that netns, else a new one (a thread's trip into it). `keep_socket`
    /// gives it back.
    pub(super) fn pod_socket(&mut self, path: &Path) -> std::io::Result<(Rtnl, u64)> {
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
    pub(super) fn keep_socket(&mut self, path: &Path, rtnl: Rtnl, cookie: u64) {
        if let Ok(id) = netns_id(path) {
            self.pod_ns = Some((id, rtnl, cookie));
        }
    }

    /// Finds `ifname` in the netns at `netns`: a socket there, its key, and the host
    /// side of its veth when that is in the agent's netns (bridge and ptp delegates
    /// put it there; macvlan and VFs have none).
    pub(super) fn find(&mut self, netns: &Path, ifname: &str) -> Result<Found, DataplaneError> {
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
    pub(super) fn make(
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
    pub(super) fn remove(
        &mut self,
        slot: u32,
        pod: Option<&mut Rtnl>,
    ) -> Result<(), DataplaneError> {
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
    pub(super) fn remove_filters(&mut self, class: u32, m: &SlotMeta, pod: Option<&mut Rtnl>) {
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
}
