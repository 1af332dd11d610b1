//! Running packets through a slot's programs (BPF_PROG_TEST_RUN), for tests and
//! benchmarks.

use super::loader::classifier;
use super::*;

/// The program tests and benchmarks run packets through (BPF_PROG_TEST_RUN).
pub(super) const PROBE_PROGRAM: &str = "trellis_probe";

/// One slot's programs as its filters would run them, through BPF_PROG_TEST_RUN,
/// with the slot's counters and its network's ACL.
pub struct Probe {
    pub slot: u32,
    class: u32,
    program: ProgramFd,
}

impl Probe {
    /// Runs `packet` (an Ethernet frame) `repeat` times through the program of `dir`:
    /// its verdict (TCX_NEXT passes, TCX_DROP drops) and the kernel's mean time per
    /// run (the probe's tail call into the program included).
    pub fn run(
        &self,
        dir: u32,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        self.run_hook(dir, packet, repeat)
    }

    /// As `run`, through the program on the host side of a veth.
    pub fn run_peer(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        self.run_hook(HOOK_PEER, packet, repeat)
    }

    /// As `run`, through the probe alone (its tail call finds no program): what the
    /// probe itself costs, to read the other figures by.
    pub fn run_probe_only(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        self.run_hook(HOOKS, packet, repeat)
    }

    fn run_hook(
        &self,
        hook: u32,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        testrun::test_run(
            self.program.as_fd(),
            packet,
            repeat,
            Some(&[self.class, hook]),
        )
        .map_err(|e| op("BPF_PROG_TEST_RUN")(e.to_string()))
    }
}

/// Runs `packet` `repeat` times through the loaded classifier `name` of `bpf`
/// (BPF_PROG_TEST_RUN): its return value and the kernel's mean time per run.
pub fn test_run(
    bpf: &Ebpf,
    name: &str,
    packet: &[u8],
    repeat: u32,
) -> Result<(i32, std::time::Duration), DataplaneError> {
    let p: &SchedClassifier = bpf
        .program(name)
        .ok_or_else(|| DataplaneError::Load(format!("no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Load(e.to_string()))?;
    let fd = p
        .fd()
        .map_err(|e| DataplaneError::Load(format!("{name}: {e}")))?;
    testrun::test_run(fd.as_fd(), packet, repeat, None)
        .map_err(|e| op(format!("{name}: BPF_PROG_TEST_RUN"))(e.to_string()))
}

impl Dataplane {
    /// Loads the probe program and points its PROBE table at the hooks' programs.
    pub(super) fn ready_probe(&mut self) -> Result<ProgramFd, DataplaneError> {
        if !self.probe_ready {
            load_classifier(&mut self.bpf, PROBE_PROGRAM)?;
            let progs: Vec<ProgramFd> = self
                .progs
                .iter()
                .map(|p| p.try_clone())
                .collect::<Result<_, _>>()
                .map_err(|e| op("duplicating a program fd")(e.to_string()))?;
            let mut table: ProgramArray<&mut MapData> =
                ProgramArray::try_from(self.map_mut(maps::PROBE))
                    .map_err(|e| op("PROBE map")(e.to_string()))?;
            for (hook, p) in progs.iter().enumerate() {
                table
                    .set(hook as u32, p, 0)
                    .map_err(|e| op("PROBE map")(e.to_string()))?;
            }
            self.probe_ready = true;
        }
        classifier(&mut self.bpf, PROBE_PROGRAM)?
            .fd()
            .and_then(|fd| fd.try_clone().map_err(Into::into))
            .map_err(|e| DataplaneError::Load(format!("{PROBE_PROGRAM}: {e}")))
    }

    /// A slot for `owner` attached nowhere, to run packets through its programs
    /// with BPF_PROG_TEST_RUN (tests, benchmarks). `detach` frees it.
    pub fn probe(&mut self, owner: &Owner) -> Result<Probe, DataplaneError> {
        self.probe_policed(owner, &Limits::default())
    }

    /// As `probe`, with `limits` kept by the programs' token bucket in both
    /// directions (as `ingress_limit = "police"` keeps ingress).
    pub fn probe_policed(
        &mut self,
        owner: &Owner,
        limits: &Limits,
    ) -> Result<Probe, DataplaneError> {
        self.probe_with(owner, limits, None)
    }

    /// As `probe_policed`, on a logical network.
    pub fn probe_with(
        &mut self,
        owner: &Owner,
        limits: &Limits,
        logical: Option<LogicalNet>,
    ) -> Result<Probe, DataplaneError> {
        let meta = slot_meta(owner, Path::new(""))?;
        let slot = self.free_slot()?;
        self.own(slot, meta)?;
        let made = (|| {
            let header = self.acl_header_of(&owner.network)?;
            self.set_slot_acl(slot, header)?;
            self.zero_counters(slot)?;
            for (dir, limit) in [(DIR_INGRESS, limits.ingress), (DIR_EGRESS, limits.egress)] {
                let p = limit.map(|r| Policer::new(r.rate, r.burst, POLICE_DROP));
                self.set_police(slot, dir, p.unwrap_or_default())?;
            }
            self.set_logical(slot, logical)?;
            let class = classid(slot, self.next_generation(slot)?);
            Ok(Probe {
                slot,
                class,
                program: self.ready_probe()?,
            })
        })();
        if made.is_err() {
            let _ = self.remove(slot, None);
        }
        made
    }
}
