//! TCX programs for every kernel interface an attachment makes: accounting per
//! attachment slot and direction, and the network's ACL. Built for the BPF target only; on the host this is
//! an empty program so that workspace-wide builds and lints pass.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod packet;

#[cfg(target_arch = "bpf")]
mod tc {
    use aya_ebpf::macros::{classifier, map};
    use aya_ebpf::maps::{Array, HashMap, PerCpuArray};
    use aya_ebpf::programs::TcContext;
    use crate::packet::{parse, Packet};
    use trellis_ebpf_common::{
        acl_key, AclInfo, AclTableV4, AclTableV6, Counters, SlotMeta, Span, ACL_HIT_STRIDE,
        ACL_SEARCH_STEPS, ACT_DENY, DIR_EGRESS, DIR_INGRESS, MAX_ACLS, MAX_ACL_RULES,
        MAX_RULES_PER_CIDR, MAX_SLOTS, PROTO_ANY, TCX_DROP, TCX_NEXT,
    };

    /// This instance's attachment slot: the agent loads the object once per attachment
    /// with this set (the maps are shared through their pins), so the programs need no
    /// per-packet lookup to know whose packet it is.
    #[unsafe(no_mangle)]
    static SLOT: u32 = 0;

    /// Slot and direction -> counters.
    #[map(name = "STATS")]
    static STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SLOTS * 2, 0);

    /// Slot -> who it belongs to; written by userspace only, read by `trellis stats`.
    #[map(name = "META")]
    static META: HashMap<u32, SlotMeta> = HashMap::pinned(MAX_SLOTS, 0);

    /// Slot -> its network's ACL id + 1 (0: no ACL). A map, not a constant, so a NAD
    /// that gains or loses an ACL changes live attachments.
    #[map(name = "SLOT_ACL")]
    static SLOT_ACL: Array<u32> = Array::pinned(MAX_SLOTS, 0);

    /// BPF_F_NO_PREALLOC: a replaced value is freed after an RCU grace period, so a
    /// program mid-lookup keeps reading the old table, never a half-written one.
    const NO_PREALLOC: u32 = 1;

    /// `acl_key(acl, direction)` -> that ACL's IPv4 table.
    #[map(name = "ACL_V4")]
    static ACL_V4: HashMap<u32, AclTableV4> = HashMap::pinned(MAX_ACLS * 2, NO_PREALLOC);

    /// `acl_key(acl, direction)` -> that ACL's IPv6 table.
    #[map(name = "ACL_V6")]
    static ACL_V6: HashMap<u32, AclTableV6> = HashMap::pinned(MAX_ACLS * 2, NO_PREALLOC);

    /// ACL id -> network and digest; written by userspace only.
    #[map(name = "ACL_INFO")]
    static ACL_INFO: HashMap<u32, AclInfo> = HashMap::pinned(MAX_ACLS, 0);

    /// `acl * ACL_HIT_STRIDE + rule` -> packets that rule decided (the last one of each
    /// ACL is its default). Shared across CPUs (atomic adds): per-CPU copies of
    /// 640,064 counters would cost too much memory.
    #[map(name = "RULE_HITS")]
    static RULE_HITS: Array<u64> = Array::pinned(MAX_ACLS * ACL_HIT_STRIDE, 0);

    #[inline(always)]
    fn opaque(mut x: u32) -> u32 {
        // SAFETY: an empty asm block; it only hides the value from the optimiser.
        unsafe { core::arch::asm!("/* {0} */", inout(reg) x) };
        x
    }

    /// The first rule of the span that matches the packet: (action, hit index).
    #[inline(always)]
    fn first_match(
        rules: &[trellis_ebpf_common::AclRule; MAX_ACL_RULES as usize],
        span: Span,
        p: &Packet,
    ) -> Option<(u8, u32)> {
        let mut k = 0u32;
        while k < MAX_RULES_PER_CIDR {
            if k >= span.count as u32 {
                return None;
            }
            // Opaque to LLVM: otherwise it walks a pointer across iterations, whose
            // range the verifier cannot bound.
            let i = opaque(span.first as u32 + k) as usize;
            let r = rules.get(i)?;
            let proto_ok = r.proto == PROTO_ANY || r.proto == p.proto;
            let ports_ok =
                r.port_hi == 0 || matches!(p.dport, Some(d) if d >= r.port_lo && d <= r.port_hi);
            if proto_ok && ports_ok {
                return Some((r.action, r.id as u32));
            }
            k += 1;
        }
        None
    }

    /// Index of the interval holding `addr`: the last start <= addr (starts[0] is 0).
    #[inline(always)]
    fn search<T: PartialOrd + Copy>(starts: &[T], len: u32, addr: T) -> Option<usize> {
        let mut lo = 0usize;
        let mut size = len as usize;
        let mut step = 0;
        while step < ACL_SEARCH_STEPS && size > 1 {
            let half = size / 2;
            let mid = lo + half;
            if *starts.get(mid)? <= addr {
                lo = mid;
            }
            size -= half;
            step += 1;
        }
        Some(lo)
    }

    /// The ACL's decision for this packet: (action, hit index), or None to let it pass
    /// unjudged (not IP, neighbour discovery, no table).
    #[inline(always)]
    fn judge(ctx: &TcContext, acl: u32, dir: u32) -> Option<(u8, u32)> {
        let p = parse(ctx, dir)?;
        let key = acl_key(acl, dir);
        if p.v6 {
            // SAFETY: the value lives until this program returns (RCU).
            let t = unsafe { ACL_V6.get(&key)? };
            let i = search(&t.starts, t.len, p.remote6)?;
            let span = *t.spans.get(i)?;
            Some(first_match(&t.rules, span, &p).unwrap_or((t.default_action as u8, MAX_ACL_RULES)))
        } else {
            // SAFETY: as above.
            let t = unsafe { ACL_V4.get(&key)? };
            let i = search(&t.starts, t.len, p.remote4)?;
            let span = *t.spans.get(i)?;
            Some(first_match(&t.rules, span, &p).unwrap_or((t.default_action as u8, MAX_ACL_RULES)))
        }
    }

    #[inline(always)]
    fn account(ctx: &TcContext, dir: u32) -> i32 {
        // SAFETY: a constant the loader set; volatile so it is not folded to 0.
        let slot = unsafe { core::ptr::read_volatile(&SLOT) };
        let mut verdict = TCX_NEXT;
        if let Some(&acl) = SLOT_ACL.get(slot) {
            if acl != 0 {
                if let Some((action, hit)) = judge(ctx, acl - 1, dir) {
                    if let Some(h) = RULE_HITS.get_ptr_mut((acl - 1) * ACL_HIT_STRIDE + hit) {
                        // SAFETY: a valid, aligned u64 in the map's value area; BPF's
                        // atomic add (core has no atomic RMW for the BPF target).
                        unsafe {
                            core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) h, in(reg) 1u64)
                        };
                    }
                    if action == ACT_DENY {
                        verdict = TCX_DROP;
                    }
                }
            }
        }
        if let Some(c) = STATS.get_ptr_mut(slot * 2 + dir) {
            // SAFETY: per-CPU slot, no other writer on this CPU while we run.
            unsafe {
                if verdict == TCX_DROP {
                    (*c).drops += 1;
                } else {
                    (*c).packets += 1;
                    (*c).bytes += ctx.len() as u64;
                }
            }
        }
        verdict
    }

    #[classifier]
    pub fn trellis_ingress(ctx: TcContext) -> i32 {
        account(&ctx, DIR_INGRESS)
    }

    #[classifier]
    pub fn trellis_egress(ctx: TcContext) -> i32 {
        account(&ctx, DIR_EGRESS)
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
