//! BPF_PROG_TEST_RUN with a context: packets through the programs as a filter of a
//! given slot would run them (tests, benchmarks). aya's test run takes no context,
//! and the probe program reads the filter's classid and hook from `cb`; so this is
//! the bpf(2) command itself, from the layouts in include/uapi/linux/bpf.h.

use std::os::fd::{AsRawFd, BorrowedFd};

/// bpf(2) command.
const BPF_PROG_TEST_RUN: libc::c_long = 10;

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
/// with `cb` as the first words of `__sk_buff.cb` if given: its return value and the
/// kernel's mean time per run.
pub fn test_run(
    prog: BorrowedFd<'_>,
    packet: &[u8],
    repeat: u32,
    cb: Option<&[u32]>,
) -> std::io::Result<(i32, std::time::Duration)> {
    let mut ctx = SkBuffCtx::default();
    if let Some(v) = cb {
        ctx.cb[..v.len()].copy_from_slice(v);
    }
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_in: packet.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    if cb.is_some() {
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
        // `struct __sk_buff` is 192 bytes; cb starts at 48.
        assert_eq!(std::mem::size_of::<SkBuffCtx>(), 192);
        assert_eq!(std::mem::offset_of!(SkBuffCtx, cb), 48);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
    }
}
