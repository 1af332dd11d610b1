//! tc programs for every kernel interface an attachment makes: accounting per
//! attachment slot and direction, and the network's ACL. Loaded once per agent and
//! attached as every interface's tc filters, which name their slot (see `slot`). Built for the BPF target
//! only; on the host this is an empty program so that workspace-wide builds and lints
//! pass.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod addresses;
#[cfg(target_arch = "bpf")]
mod packet;

#[cfg(target_arch = "bpf")]
mod tc {
    use crate::addresses::{
        addresses, link_local, link_multicast, Addrs, ND_NEIGHBOR_ADVERT, ND_NEIGHBOR_SOLICIT,
        ND_ROUTER_SOLICIT,
    };
    use crate::packet::{count, parse, rule_matches, Packet, Verdict};
    use aya_ebpf::helpers::{bpf_ktime_get_ns, bpf_redirect};
    use aya_ebpf::macros::{classifier, map};
    use aya_ebpf::maps::{Array, HashMap, PerCpuArray, ProgramArray};
    use aya_ebpf::programs::TcContext;
    use trellis_ebpf_common::{
        slot_of, stats_index, table_index, uses_police, AclHeader, AclInfo, AclRule, Bucket,
        Counters, IntervalV4, IntervalV6, LogicalNet, Policer, SlotMeta, SlotState, Span, TableRef,
        ACL_HIT_NONE, ACL_SEARCH_STEPS, ACL_SPACE, ACT_DENY, DIR_EGRESS, DIR_INGRESS, HIT_SPACE,
        HOOKS, IDX_SPACE, LOGICAL_PREFIXES, MAX_ACLS, MAX_RULES_PER_CIDR, MAX_SLOTS, MMAPABLE,
        NO_PREALLOC, POLICE_HORIZON_NS, POLICE_PACE, POLICE_QUEUE, POLICE_SHIFT, RULE_SPACE,
        TCX_DROP, TCX_NEXT, USES_LOGICAL,
    };

    // Every map here is listed, with its shape, in trellis_ebpf_common::MAPS (the
    // agent's tests compare this object with it): change both, and LAYOUT_VERSION.

    /// Slot and direction (`stats_index`) -> counters.
    #[map(name = "STATS")]
    static STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SLOTS * 2, 0);

    /// Slot -> who it belongs to; written by userspace only, read by `trellis stats`.
    #[map(name = "META")]
    static META: HashMap<u32, SlotMeta> = HashMap::pinned(MAX_SLOTS, NO_PREALLOC);

    /// Entry 0: the LAYOUT_VERSION of the pins in this directory (written by the
    /// loader; read by the next one before it re-adopts them).
    #[map(name = "LAYOUT")]
    static LAYOUT: Array<u32> = Array::pinned(1, 0);

    /// Slot -> its generation, ACL and what else applies (see SlotState).
    #[map(name = "SLOT")]
    static SLOT: Array<SlotState> = Array::pinned(MAX_SLOTS, 0);

    /// Hook -> its program, for `trellis_probe` only (tests and benchmarks run
    /// packets through the programs with BPF_PROG_TEST_RUN, which cannot set
    /// tc_classid). Not pinned: each loader fills its own.
    #[map(name = "PROBE")]
    static PROBE: ProgramArray = ProgramArray::with_max_entries(HOOKS, 0);

    /// Two versions per ACL id (see AclHeader).
    #[map(name = "ACL_HDR")]
    static ACL_HDR: Array<AclHeader> = Array::pinned(MAX_ACLS * 2, 0);

    /// The IPv4 interval space every ACL's IPv4 tables are regions of.
    #[map(name = "ACL_IV4")]
    static ACL_IV4: Array<IntervalV4> = Array::pinned(ACL_SPACE, MMAPABLE);

    /// The IPv6 interval space.
    #[map(name = "ACL_IV6")]
    static ACL_IV6: Array<IntervalV6> = Array::pinned(ACL_SPACE, MMAPABLE);

    /// The first-level bucket space (see TableRef) every table's index is a region of.
    #[map(name = "ACL_IDX")]
    static ACL_IDX: Array<Bucket> = Array::pinned(IDX_SPACE, MMAPABLE);

    /// The rule space the spans point into.
    #[map(name = "ACL_RULES")]
    static ACL_RULES: Array<AclRule> = Array::pinned(RULE_SPACE, MMAPABLE);

    /// ACL id -> network and digest; written by userspace only.
    #[map(name = "ACL_INFO")]
    static ACL_INFO: HashMap<u32, AclInfo> = HashMap::pinned(MAX_ACLS, NO_PREALLOC);

    /// Rule hit counters: each ACL header's region (`hits`, `nhits`). Shared across
    /// CPUs (atomic adds): per-CPU copies would cost too much memory. Mapped by the
    /// agent and `trellis stats`, which read and zero them as memory.
    #[map(name = "RULE_HITS")]
    static RULE_HITS: Array<u64> = Array::pinned(HIT_SPACE, MMAPABLE);

    /// Slot and direction (`stats_index`) -> its rate limit; ns_per_byte 0: none.
    /// Written by userspace at attach, `tat` by the programs (shared by all CPUs).
    #[map(name = "POLICE")]
    static POLICE: Array<Policer> = Array::pinned(MAX_SLOTS * 2, 0);

    /// Slot -> its logical network's subnets (n4 = n6 = 0: none).
    #[map(name = "LOGICAL")]
    static LOGICAL: Array<LogicalNet> = Array::pinned(MAX_SLOTS, 0);

    #[inline(always)]
    fn in4(l: &LogicalNet, a: u32) -> bool {
        let mut i = 0;
        while i < LOGICAL_PREFIXES {
            if (i as u32) < l.n4 && a & l.v4[i][1] == l.v4[i][0] {
                return true;
            }
            i += 1;
        }
        false
    }

    #[inline(always)]
    fn in6(l: &LogicalNet, a: [u64; 2]) -> bool {
        let mut i = 0;
        while i < LOGICAL_PREFIXES {
            let p = &l.v6[i];
            if (i as u32) < l.n6 && a[0] & p[2] == p[0] && a[1] & p[3] == p[1] {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether the slot's logical network (if `s` uses one) lets the packet through
    /// in `dir`: both of its addresses in the network's subnets (a pod that takes
    /// another tenant's address gets nothing out; nothing from another tenant's gets
    /// in). ARP: sender and target inside, or a probe (sender 0.0.0.0) for an
    /// address inside, or the answer to one (target 0.0.0.0). Neighbour discovery
    /// (RFC 4861's addresses): solicitations and advertisements about a link-local
    /// target or one inside, from the unspecified address (solicitations only), a
    /// link-local one or one inside, to link-scope multicast, a link-local address or
    /// one inside; router solicitations from the unspecified or a link-local address
    /// to link-scope multicast; router advertisements and redirects from a link-local
    /// address, coming in only (a pod is no router). Nothing else passes: no other
    /// EtherType, no VLAN tag, nothing that cannot be read.
    #[inline(always)]
    fn logical_ok(ctx: &TcContext, slot: u32, s: &SlotState, dir: u32) -> bool {
        if s.uses & USES_LOGICAL == 0 {
            return true;
        }
        let Some(l) = LOGICAL.get(slot) else {
            return false;
        };
        match addresses(ctx) {
            Addrs::Other | Addrs::Unreadable => false,
            Addrs::Arp(s, t) => (s == 0 && in4(l, t)) || (in4(l, s) && (t == 0 || in4(l, t))),
            Addrs::V4(s, d) => in4(l, s) && in4(l, d),
            Addrs::V6(s, d) => in6(l, s) && in6(l, d),
            Addrs::Nd(t, target, src, dst) => {
                let unspecified = src == [0, 0];
                let to = link_multicast(dst) || link_local(dst) || in6(l, dst);
                let about = link_local(target) || in6(l, target);
                match t {
                    ND_NEIGHBOR_SOLICIT => {
                        (unspecified || link_local(src) || in6(l, src)) && to && about
                    }
                    ND_NEIGHBOR_ADVERT => (link_local(src) || in6(l, src)) && to && about,
                    ND_ROUTER_SOLICIT => (unspecified || link_local(src)) && link_multicast(dst),
                    _ => dir == DIR_INGRESS && link_local(src),
                }
            }
        }
    }

    /// If `*p == old`, `*p = new`, atomically; returns what `*p` was.
    ///
    /// # Safety
    /// `p` is a valid, aligned u64 in a map's value area.
    #[inline(always)]
    unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> u64 {
        let mut r0 = old;
        // SAFETY: as the caller promises; BPF_ATOMIC | BPF_CMPXCHG (kernel >= 5.12).
        unsafe {
            core::arch::asm!(
                "r0 = cmpxchg_64({p} + 0, r0, {new})",
                p = in(reg) p,
                new = in(reg) new,
                inout("r0") r0,
            )
        };
        r0
    }

    /// What the rate limit does with a packet.
    enum Limit {
        Pass,
        Drop,
        /// To this ifb device, to be queued.
        Queue(u32),
    }

    /// The slot's rate limit in `dir` for this packet: whether it may go (in
    /// POLICE_PACE mode, at the departure time it is given), or where it is queued.
    #[inline(always)]
    fn police(ctx: &TcContext, slot: u32, s: &SlotState, dir: u32) -> Limit {
        if s.uses & uses_police(dir) == 0 {
            return Limit::Pass;
        }
        let Some(p) = POLICE.get_ptr_mut(stats_index(slot, dir)) else {
            return Limit::Pass;
        };
        // SAFETY: a valid entry; these fields are written by userspace only.
        let (ns_per_byte, burst_ns, mode, ifindex) =
            unsafe { ((*p).ns_per_byte, (*p).burst_ns, (*p).mode, (*p).ifindex) };
        if mode == POLICE_QUEUE && ifindex != 0 {
            return Limit::Queue(ifindex);
        }
        if ns_per_byte == 0 {
            return Limit::Pass;
        }
        let cost = (ctx.len() as u64 * ns_per_byte) >> POLICE_SHIFT;
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: the entry's first field.
        let tat_ptr = unsafe { &raw mut (*p).tat };
        let mut tries = 0;
        while tries < 4 {
            // SAFETY: as above; other CPUs write it with cmpxchg only.
            let tat = unsafe { core::ptr::read_volatile(tat_ptr) };
            let next = if tat > now { tat } else { now } + cost;
            // How long the packet must wait for its tokens: none if the bucket was
            // full (even for a packet bigger than the burst).
            let wait = if tat <= now {
                0
            } else {
                (next - now).saturating_sub(burst_ns)
            };
            let paced = mode == POLICE_PACE;
            if wait > 0 && (!paced || wait > POLICE_HORIZON_NS) {
                return Limit::Drop;
            }
            // SAFETY: as above.
            if unsafe { cmpxchg(tat_ptr, tat, next) } == tat {
                if paced && wait > 0 {
                    // SAFETY: tstamp is writable in tc programs; fq holds the packet
                    // until then (a later time set by the socket is kept).
                    unsafe {
                        let skb = ctx.skb.skb;
                        if (*skb).tstamp < now + wait {
                            (*skb).tstamp = now + wait;
                        }
                    }
                }
                return Limit::Pass;
            }
            tries += 1;
        }
        // Lost the race every time: other CPUs are taking the tokens. A paced packet
        // goes (fq still orders it by its socket's own time); a policed one does not.
        if mode == POLICE_PACE {
            Limit::Pass
        } else {
            Limit::Drop
        }
    }

    /// The first rule of `t`'s span that matches the packet: (action, rule id).
    #[inline(always)]
    fn first_match(t: &TableRef, span: Span, p: &Packet) -> Option<(u8, u32)> {
        let mut k = 0u32;
        while k < MAX_RULES_PER_CIDR {
            if k >= span.count as u32 {
                return None;
            }
            let r = ACL_RULES.get(t.rules + span.first as u32 + k)?;
            if rule_matches(r, p) {
                return Some((r.action, r.id as u32));
            }
            k += 1;
        }
        None
    }

    /// The first-level bucket of an address `(hi, lo)` in table `t` (IPv4: hi = 0);
    /// None below `lo`, the table's second start: such an address is in interval 0.
    #[inline(always)]
    fn bucket(t: &TableRef, hi: u64, lo: u64) -> Option<u32> {
        let last = 1u64 << (t.bits & 31);
        if hi < t.lo[0] || (hi == t.lo[0] && lo < t.lo[1]) {
            return None;
        }
        let borrow = (lo < t.lo[1]) as u64;
        let dlo = lo.wrapping_sub(t.lo[1]);
        let dhi = hi - t.lo[0] - borrow;
        let shift = t.shift & 127;
        let b = if shift >= 64 {
            dhi >> (shift - 64)
        } else if shift == 0 {
            if dhi != 0 {
                last
            } else {
                dlo
            }
        } else if dhi >> shift != 0 {
            last
        } else {
            (dhi << (64 - shift)) | (dlo >> shift)
        };
        Some(if b > last { last as u32 } else { b as u32 })
    }

    /// Index (from the table's base) of the interval holding an address: the last
    /// whose start is `at_or_below` it (a table's first start is 0), searched among
    /// bucket `b`'s intervals.
    #[inline(always)]
    fn search(t: &TableRef, b: u32, at_or_below: impl Fn(u32) -> Option<bool>) -> Option<u32> {
        let bucket = ACL_IDX.get(t.idx + b)?;
        let mut lo = bucket.first;
        let mut size = bucket.last.checked_sub(lo)? + 1;
        let mut step = 0;
        while step < ACL_SEARCH_STEPS && size > 1 {
            let half = size / 2;
            let mid = lo + half;
            if at_or_below(t.base + mid)? {
                lo = mid;
            }
            size -= half;
            step += 1;
        }
        Some(lo)
    }

    /// The ACL's decision for this packet: (action, hit index in the ACL's region),
    /// or None to let it pass unjudged (not IP, neighbour discovery). A packet that
    /// cannot be judged is dropped, counted under no rule.
    #[inline(always)]
    fn judge(ctx: &TcContext, hdr: &AclHeader, dir: u32) -> Option<(u8, u32)> {
        let p = parse(ctx, dir)?;
        if p.malformed {
            return Some((ACT_DENY, ACL_HIT_NONE));
        }
        let t = hdr.tables.get(table_index(p.v6, dir))?;
        let span = if p.v6 {
            let i = match bucket(t, p.remote6[0], p.remote6[1]) {
                // Compared half by half: an array comparison is a loop to the verifier.
                Some(b) => search(t, b, |i| {
                    let [hi, lo] = ACL_IV6.get(i)?.start;
                    let [ahi, alo] = p.remote6;
                    Some(hi < ahi || (hi == ahi && lo <= alo))
                })?,
                None => 0,
            };
            ACL_IV6.get(t.base + i)?.span
        } else {
            let i = match bucket(t, 0, p.remote4 as u64) {
                Some(b) => search(t, b, |i| Some(ACL_IV4.get(i)?.start <= p.remote4))?,
                None => 0,
            };
            ACL_IV4.get(t.base + i)?.span
        };
        let default = hdr.nhits.checked_sub(1)?;
        Some(first_match(t, span, &p).unwrap_or((hdr.default_action as u8, default)))
    }

    /// The slot of the filter running us and its state: its classid (cls_bpf puts
    /// it in tc_classid before the program runs), if its generation is the slot's
    /// current.
    #[inline(always)]
    fn slot(ctx: &TcContext) -> Option<(u32, SlotState)> {
        // SAFETY: the context the kernel passed; tc_classid is readable in tc programs.
        let classid = unsafe { (*ctx.skb.skb).tc_classid };
        let (slot, generation) = slot_of(classid);
        if classid == 0 {
            return None;
        }
        let s = *SLOT.get(slot)?;
        (s.generation == generation).then_some((slot, s))
    }

    /// The slot's ACL verdict for this packet in direction `dir` (TCX_NEXT or
    /// TCX_DROP); the deciding rule's hit is counted if the packet is dropped or
    /// `count_allowed`.
    #[inline(always)]
    fn acl_verdict(ctx: &TcContext, s: &SlotState, dir: u32, count_allowed: bool) -> i32 {
        let Some(hdr) = (s.acl != 0).then(|| ACL_HDR.get(s.acl - 1)).flatten() else {
            return TCX_NEXT;
        };
        let Some((action, hit)) = judge(ctx, hdr, dir) else {
            return TCX_NEXT;
        };
        let deny = action == ACT_DENY;
        if hit != ACL_HIT_NONE && hit < hdr.nhits && (deny || count_allowed) {
            if let Some(h) = RULE_HITS.get_ptr_mut(hdr.hits + hit) {
                // SAFETY: a valid, aligned u64 in the map's value area; BPF's atomic
                // add (core has no atomic RMW for the BPF target).
                unsafe {
                    core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) h, in(reg) 1u64)
                };
            }
        }
        if deny {
            TCX_DROP
        } else {
            TCX_NEXT
        }
    }

    #[inline(always)]
    fn account(ctx: &TcContext, dir: u32) -> i32 {
        let Some((slot, s)) = slot(ctx) else {
            return TCX_NEXT;
        };
        let mut queue = None;
        let verdict =
            if !logical_ok(ctx, slot, &s, dir) || acl_verdict(ctx, &s, dir, true) == TCX_DROP {
                Verdict::Denied
            } else {
                match police(ctx, slot, &s, dir) {
                    Limit::Pass => Verdict::Pass,
                    Limit::Drop => Verdict::Limited,
                    Limit::Queue(ifindex) => {
                        queue = Some(ifindex);
                        Verdict::Pass
                    }
                }
            };
        if let Some(c) = STATS.get_ptr_mut(stats_index(slot, dir)) {
            // SAFETY: a per-CPU entry; no other writer on this CPU while we run.
            unsafe { count(c, verdict, ctx.len()) };
        }
        match (verdict, queue) {
            // Out of the ifb's queue it comes back to this interface past tc.
            // SAFETY: a helper taking plain values.
            (Verdict::Pass, Some(ifindex)) => unsafe { bpf_redirect(ifindex, 0) as i32 },
            (Verdict::Pass, None) => TCX_NEXT,
            _ => TCX_DROP,
        }
    }

    #[classifier]
    pub fn trellis_ingress(ctx: TcContext) -> i32 {
        account(&ctx, DIR_INGRESS)
    }

    #[classifier]
    pub fn trellis_egress(ctx: TcContext) -> i32 {
        account(&ctx, DIR_EGRESS)
    }

    /// At the host side of a pod's veth (its tc ingress): what the pod sends, judged
    /// again by the pod's egress rules, for a pod that skipped its own egress hook
    /// (AF_PACKET with PACKET_QDISC_BYPASS). Only drops are counted here; what
    /// passes was counted at the pod's egress, or bypassed it.
    #[classifier]
    pub fn trellis_peer(ctx: TcContext) -> i32 {
        let Some((slot, s)) = slot(&ctx) else {
            return TCX_NEXT;
        };
        let verdict = if logical_ok(&ctx, slot, &s, DIR_EGRESS) {
            acl_verdict(&ctx, &s, DIR_EGRESS, false)
        } else {
            TCX_DROP
        };
        if verdict == TCX_DROP {
            if let Some(c) = STATS.get_ptr_mut(stats_index(slot, DIR_EGRESS)) {
                // SAFETY: as in `account`.
                unsafe { count(c, Verdict::Denied, ctx.len()) };
            }
        }
        verdict
    }

    /// A packet in BPF_PROG_TEST_RUN (tests, benchmarks): `cb[0]` holds the classid
    /// a filter would have, `cb[1]` the hook; runs that hook's program as a filter
    /// would. Never attached.
    #[classifier]
    pub fn trellis_probe(mut ctx: TcContext) -> i32 {
        let (Some(&classid), Some(&hook)) = (ctx.cb().first(), ctx.cb().get(1)) else {
            return TCX_NEXT;
        };
        // SAFETY: tc_classid is writable in tc programs.
        unsafe { (*ctx.skb.skb).tc_classid = classid };
        // SAFETY: a tail call into a program of the same type; on failure we go on.
        unsafe { PROBE.tail_call(&mut ctx, hook) };
        TCX_NEXT
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("trellis-tc is an eBPF object; the agent embeds the BPF build of it");
}
