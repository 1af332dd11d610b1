//! The benchmark baseline for the ACL lookup: the same parse and accounting as the
//! TCX programs with the rules in a kernel LPM trie (ebpf/programs/src/bench_lpm.rs).
//! Loaded only by `trellis-bench-dataplane`, never attached.

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::MapData;
use aya::{Ebpf, EbpfLoader};
use std::net::IpAddr;
use trellis_agent::dataplane::DataplaneError;
use trellis_ebpf_common::AclRule;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/trellis-bench-lpm"));

pub struct LpmBaseline {
    bpf: Ebpf,
}

fn err(what: &str) -> impl Fn(String) -> DataplaneError + '_ {
    move |message| DataplaneError::Op {
        what: what.to_string(),
        message,
    }
}

impl LpmBaseline {
    pub fn load() -> Result<LpmBaseline, DataplaneError> {
        let mut bpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| DataplaneError::Load(e.to_string()))?;
        for name in ["lpm_ingress", "floor", "counter_only"] {
            trellis_agent::dataplane::load_classifier(&mut bpf, name)?;
        }
        Ok(LpmBaseline { bpf })
    }

    /// Puts `rule` on the prefix `addr/len`.
    pub fn insert(&mut self, addr: IpAddr, len: u8, rule: AclRule) -> Result<(), DataplaneError> {
        match addr {
            IpAddr::V4(a) => {
                let mut m: LpmTrie<&mut MapData, [u8; 4], AclRule> =
                    LpmTrie::try_from(self.bpf.map_mut("LPM_V4").expect("LPM_V4"))
                        .map_err(|e| err("LPM_V4")(e.to_string()))?;
                m.insert(&Key::new(len as u32, a.octets()), rule, 0)
                    .map_err(|e| err("LPM_V4")(e.to_string()))
            }
            IpAddr::V6(a) => {
                let mut m: LpmTrie<&mut MapData, [u8; 16], AclRule> =
                    LpmTrie::try_from(self.bpf.map_mut("LPM_V6").expect("LPM_V6"))
                        .map_err(|e| err("LPM_V6")(e.to_string()))?;
                m.insert(&Key::new(len as u32, a.octets()), rule, 0)
                    .map_err(|e| err("LPM_V6")(e.to_string()))
            }
        }
    }

    /// As `Probe::run` for the ingress direction.
    pub fn run(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        self.run_program("lpm_ingress", packet, repeat)
    }

    /// Runs one of the object's programs: `lpm_ingress`, `floor` (does nothing: the
    /// harness's own cost) or `counter_only` (one per-CPU counter).
    pub fn run_program(
        &self,
        name: &str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DataplaneError> {
        trellis_agent::dataplane::test_run(&self.bpf, name, packet, repeat)
    }
}
