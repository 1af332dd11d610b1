//! Benchmark baseline, never attached by the agent: the same parse and accounting as
//! trellis-tc, with the ACL looked up in the kernel's LPM trie (one rule per prefix)
//! instead of trellis's interval tables. `trellis-bench-dataplane` runs both side by
//! side through BPF_PROG_TEST_RUN.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod packet;

#[cfg(target_arch = "bpf")]
mod lpm {
    use crate::packet::{count, parse, rule_matches, Verdict};
    use aya_ebpf::macros::{classifier, map};
    use aya_ebpf::maps::lpm_trie::{Key, LpmTrie};
    use aya_ebpf::maps::PerCpuArray;
    use aya_ebpf::programs::TcContext;
    use trellis_ebpf_common::{AclRule, Counters, ACT_DENY, DIR_INGRESS, TCX_DROP, TCX_NEXT};

    #[map(name = "LPM_V4")]
    static LPM_V4: LpmTrie<[u8; 4], AclRule> = LpmTrie::with_max_entries(65536, 0);
    #[map(name = "LPM_V6")]
    static LPM_V6: LpmTrie<[u8; 16], AclRule> = LpmTrie::with_max_entries(65536, 0);
    #[map(name = "LPM_STATS")]
    static LPM_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(2, 0);

    #[classifier]
    pub fn lpm_ingress(ctx: TcContext) -> i32 {
        let mut verdict = TCX_NEXT;
        if let Some(p) = parse(&ctx, DIR_INGRESS) {
            let rule = if p.v6 {
                let mut a = [0u8; 16];
                a[..8].copy_from_slice(&p.remote6[0].to_be_bytes());
                a[8..].copy_from_slice(&p.remote6[1].to_be_bytes());
                LPM_V6.get(&Key::new(128, a))
            } else {
                LPM_V4.get(&Key::new(32, p.remote4.to_be_bytes()))
            };
            if let Some(r) = rule {
                if rule_matches(r, &p) && r.action == ACT_DENY {
                    verdict = TCX_DROP;
                }
            }
        }
        if let Some(c) = LPM_STATS.get_ptr_mut(0) {
            // SAFETY: a per-CPU entry; no other writer on this CPU while we run.
            unsafe {
                count(
                    c,
                    if verdict == TCX_DROP {
                        Verdict::Denied
                    } else {
                        Verdict::Pass
                    },
                    ctx.len(),
                )
            };
        }
        verdict
    }

    /// The BPF_PROG_TEST_RUN floor: a program that does nothing.
    #[classifier]
    pub fn floor(_ctx: TcContext) -> i32 {
        TCX_NEXT
    }

    /// The floor plus one per-CPU counter update.
    #[classifier]
    pub fn counter_only(ctx: TcContext) -> i32 {
        if let Some(c) = LPM_STATS.get_ptr_mut(1) {
            // SAFETY: per-CPU slot.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += ctx.len() as u64;
            }
        }
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
    eprintln!("trellis-bench-lpm is an eBPF object for trellis-bench-dataplane");
}
