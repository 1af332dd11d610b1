//! TCX programs for every kernel interface an attachment makes: accounting per
//! attachment slot and direction, and the network's ACL. Built for the BPF target only; on the host this is
//! an empty program so that workspace-wide builds and lints pass.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod tc {
    use aya_ebpf::macros::{classifier, map};
    use aya_ebpf::maps::{Array, HashMap, PerCpuArray};
    use aya_ebpf::programs::TcContext;
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

    const ETH_HLEN: usize = 14;
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const ETH_P_8021Q: u16 = 0x8100;
    const ETH_P_8021AD: u16 = 0x88a8;
    const IPPROTO_TCP: u8 = 6;
    const IPPROTO_UDP: u8 = 17;
    const IPPROTO_SCTP: u8 = 132;
    const IPPROTO_ICMPV6: u8 = 58;
    /// Enough linear data for a VLAN tag, an IPv6 header and the ports.
    const HEADERS: usize = ETH_HLEN + 4 + 40 + 4;

    /// What the ACL looks at: the remote address, the protocol and the destination
    /// port (if the packet carries one).
    struct Packet {
        v6: bool,
        remote4: u32,
        remote6: [u64; 2],
        proto: u8,
        dport: Option<u16>,
    }

    #[inline(always)]
    fn at<T>(ctx: &TcContext, off: usize) -> Option<T> {
        let start = ctx.data();
        if start + off + core::mem::size_of::<T>() > ctx.data_end() {
            return None;
        }
        // SAFETY: bounds checked against data_end just above.
        Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
    }

    #[inline(always)]
    fn ports_of(ctx: &TcContext, proto: u8, off: usize) -> Option<u16> {
        match proto {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => at::<u16>(ctx, off + 2).map(u16::from_be),
            _ => None,
        }
    }

    /// Parses Ethernet (one VLAN tag), IPv4/IPv6 and the L4 ports. None: not IP, or
    /// IPv6 neighbour discovery, which an ACL never blocks (it would cut the link).
    #[inline(always)]
    fn parse(ctx: &TcContext, dir: u32) -> Option<Packet> {
        let linear = ctx.data_end() - ctx.data();
        if linear < HEADERS && (ctx.len() as usize) > linear {
            let _ = ctx.pull_data(HEADERS as u32);
        }
        let mut l3 = ETH_HLEN;
        let mut proto = u16::from_be(at::<u16>(ctx, 12)?);
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = u16::from_be(at::<u16>(ctx, 16)?);
            l3 += 4;
        }
        // The remote end: the source of what comes in, the destination of what goes out.
        let remote_off = if dir == DIR_INGRESS { 0 } else { 1 };
        match proto {
            ETH_P_IP => {
                let vihl: u8 = at(ctx, l3)?;
                let l4proto: u8 = at(ctx, l3 + 9)?;
                let frag = u16::from_be(at::<u16>(ctx, l3 + 6)?) & 0x1fff;
                let remote = u32::from_be(at::<u32>(ctx, l3 + 12 + 4 * remote_off)?);
                let l4 = l3 + ((vihl & 0x0f) as usize) * 4;
                // Later fragments carry no ports.
                let dport = if frag == 0 {
                    ports_of(ctx, l4proto, l4)
                } else {
                    None
                };
                Some(Packet {
                    v6: false,
                    remote4: remote,
                    remote6: [0; 2],
                    proto: l4proto,
                    dport,
                })
            }
            ETH_P_IPV6 => {
                let next: u8 = at(ctx, l3 + 6)?;
                let a = l3 + 8 + 16 * remote_off;
                let hi = u64::from_be(at::<u64>(ctx, a)?);
                let lo = u64::from_be(at::<u64>(ctx, a + 8)?);
                let l4 = l3 + 40;
                if next == IPPROTO_ICMPV6 {
                    // Router/neighbour solicitation and advertisement, redirect.
                    let t: u8 = at(ctx, l4)?;
                    if (133..=137).contains(&t) {
                        return None;
                    }
                }
                Some(Packet {
                    v6: true,
                    remote4: 0,
                    remote6: [hi, lo],
                    proto: next,
                    dport: ports_of(ctx, next, l4),
                })
            }
            _ => None,
        }
    }

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
