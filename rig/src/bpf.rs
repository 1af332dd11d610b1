//! bpf(2) for tests and benchmarks: what the dataplane has live, programs' names
//! and kernel memory, and TCX links for baselines.

use std::path::Path;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: a live `union bpf_attr` prefix of the size passed.
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

/// How many hooks are live in the dataplane pinned in `dir`: the hooks of every
/// slot its META names (ingress and egress, and the host side of a veth when it has
/// one), straight from the pinned map; 0 when there are no pins.
pub fn live_hooks(dir: &Path) -> usize {
    trellis_agent::dataplane::live_hooks(dir).unwrap_or(0)
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_LINK_CREATE: libc::c_long = 28;
/// enum bpf_attach_type: BPF_TCX_INGRESS, BPF_TCX_EGRESS.
pub const TCX_INGRESS: u32 = 46;
pub const TCX_EGRESS: u32 = 47;

#[repr(C)]
#[derive(Default)]
struct ById {
    id: u32,
    next_id: u32,
    open_flags: u32,
    _rest: [u32; 13],
}

/// IDs of the BPF programs loaded now whose id is above `after` (ids only grow).
pub fn prog_ids_after(after: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut id = after;
    loop {
        let mut a = ById {
            id,
            ..Default::default()
        };
        if bpf(BPF_PROG_GET_NEXT_ID, &mut a).is_err() {
            return out;
        }
        id = a.next_id;
        out.push(id);
    }
}

/// The highest BPF program id in use now (0: none).
pub fn last_prog_id() -> u32 {
    prog_ids_after(0).last().copied().unwrap_or(0)
}

/// The kernel memory a program holds (`memlock` of its fdinfo, as bpftool shows);
/// None if it is gone.
pub fn prog_memlock(id: u32) -> Option<u64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut a = ById {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut a).ok()?;
    // SAFETY: a new fd from the kernel.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    fd_memlock(fd.as_raw_fd())
}

/// `memlock` from /proc/self/fdinfo of a BPF program or map fd.
pub fn fd_memlock(fd: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    _rest: [u64; 16],
}

/// A tc program that passes everything (`r0 = -1; exit`), for baselines.
pub fn load_pass_program() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // BPF_ALU64|BPF_MOV|BPF_K r0 = -1; BPF_JMP|BPF_EXIT.
    let insns: [u64; 2] = [0xb7 | ((-1i32 as u32 as u64) << 32), 0x95];
    let license = c"GPL";
    let mut a = ProgLoad {
        prog_type: 3,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut a)?;
    // SAFETY: a new fd from the kernel.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 8],
}

/// Attaches `prog` to `ifindex` (in the calling thread's netns) as a TCX link of
/// `attach_type`; the link lives as long as the returned fd.
pub fn tcx_link(
    prog: std::os::fd::BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut a = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut a)?;
    // SAFETY: a new fd from the kernel.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
/// enum bpf_map_type: BPF_MAP_TYPE_ARRAY.
const MAP_TYPE_ARRAY: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Pins a new array map (u32 keys) at `path`: a pin of some other shape than the
/// agent's, for its layout checks.
pub fn pin_array(path: &Path, value_size: u32, max_entries: u32) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut attr = MapCreate {
        map_type: MAP_TYPE_ARRAY,
        key_size: 4,
        value_size,
        max_entries,
        map_flags: 0,
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel just returned this fd to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut pin)?;
    Ok(())
}
