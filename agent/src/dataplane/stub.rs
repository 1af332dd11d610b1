//! The per-attachment stub: a program of six instructions that puts its slot in
//! `cb[0]` and tail-calls the shared program for its hook (PROGS). It is what a tc
//! filter runs; loading it costs the kernel microseconds, where the shared programs
//! cost tens of milliseconds of verifier time and are loaded once per agent.
//!
//! aya loads programs from ELF objects only, so these few instructions are loaded
//! (and, for tests and benchmarks, run) with the bpf(2) commands directly, from
//! the layouts in include/uapi/linux/bpf.h.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use trellis_ebpf_common::{prog_index, SKB_CB0_OFFSET, TCX_NEXT};

/// One instruction (`struct bpf_insn`): opcode, dst (low nibble) and src registers,
/// offset, immediate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes (include/uapi/linux/bpf_common.h, bpf.h).
const MOV64_IMM: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
const STX_MEM_W: u8 = 0x03 | 0x60; // BPF_STX | BPF_MEM | BPF_W
const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
const PSEUDO_MAP_FD: u8 = 1;
const FUNC_TAIL_CALL: i32 = 12;
const PROG_TYPE_SCHED_CLS: u32 = 3;

/// bpf(2) commands.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The stub of `slot`'s `hook`: `cb[0] = slot; tail_call(PROGS, prog_index(slot,
/// hook)); return TC_ACT_UNSPEC` (an empty entry falls through: the packet goes on
/// as if nothing were attached).
fn instructions(progs_fd: i32, slot: u32, hook: u32) -> [Insn; 8] {
    [
        insn(MOV64_IMM, 2, 0, 0, slot as i32),
        insn(STX_MEM_W, 1, 2, SKB_CB0_OFFSET, 0),
        insn(LD_IMM64, 2, PSEUDO_MAP_FD, 0, progs_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_IMM, 3, 0, 0, prog_index(slot, hook) as i32),
        insn(CALL, 0, 0, 0, FUNC_TAIL_CALL),
        insn(MOV64_IMM, 0, 0, 0, TCX_NEXT),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to the fields set here; the rest of the
/// union is zero (the kernel checks that bytes past what it knows are zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u64; 12],
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
    _rest: [u64; 8],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, writable `union bpf_attr` prefix of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads the stub of `slot`'s `hook`, referring to the PROGS map `progs`.
pub fn load(progs: BorrowedFd<'_>, slot: u32, hook: u32) -> std::io::Result<OwnedFd> {
    let insns = instructions(progs.as_raw_fd(), slot, hook);
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"trellis_stub");
    let mut attr = ProgLoadAttr {
        prog_type: PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: a new fd the kernel just gave us, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `struct __sk_buff` as a test run's context (192 bytes); only `cb` is set (the
/// kernel refuses most other fields non-zero).
#[repr(C)]
#[derive(Default)]
struct SkBuffCtx {
    head: [u32; 12],
    cb: [u32; 5],
    _tail: [u32; 31],
}

/// Runs `packet` `repeat` times through the program `prog` (BPF_PROG_TEST_RUN),
/// with `cb0` in `cb[0]` if given: its return value and the kernel's mean time per
/// run.
pub fn test_run(
    prog: BorrowedFd<'_>,
    packet: &[u8],
    repeat: u32,
    cb0: Option<u32>,
) -> std::io::Result<(i32, std::time::Duration)> {
    let mut ctx = SkBuffCtx::default();
    if let Some(v) = cb0 {
        ctx.cb[0] = v;
    }
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_in: packet.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    if cb0.is_some() {
        attr.ctx_size_in = std::mem::size_of::<SkBuffCtx>() as u32;
        attr.ctx_in = &ctx as *const SkBuffCtx as u64;
    }
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((
        attr.retval as i32,
        std::time::Duration::from_nanos(attr.duration as u64),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        // `struct __sk_buff` is 192 bytes; cb starts at 48.
        assert_eq!(std::mem::size_of::<SkBuffCtx>(), 192);
        assert_eq!(std::mem::offset_of!(SkBuffCtx, cb), SKB_CB0_OFFSET as usize);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
        let i = instructions(7, 3, 1);
        assert_eq!(i[2].regs, 2 | (PSEUDO_MAP_FD << 4));
        assert_eq!(i[4].imm, 10);
    }
}
