//! TCX programs for every kernel interface an attachment makes: accounting per
//! attachment slot and direction. Built for the BPF target only; on the host this is
//! an empty program so that workspace-wide builds and lints pass.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod tc {
    use aya_ebpf::macros::{classifier, map};
    use aya_ebpf::maps::{HashMap, PerCpuArray};
    use aya_ebpf::programs::TcContext;
    use trellis_ebpf_common::{Counters, SlotMeta, DIR_EGRESS, DIR_INGRESS, MAX_SLOTS, TCX_NEXT};

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

    #[inline(always)]
    fn account(ctx: &TcContext, dir: u32) -> i32 {
        // SAFETY: a constant the loader set; volatile so it is not folded to 0.
        let slot = unsafe { core::ptr::read_volatile(&SLOT) };
        if let Some(c) = STATS.get_ptr_mut(slot * 2 + dir) {
            // SAFETY: per-CPU slot, no other writer on this CPU while we run.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += ctx.len() as u64;
            }
        }
        TCX_NEXT
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
