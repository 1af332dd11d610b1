//! The periodic sweep for pods that vanished without a DEL: a container record whose
//! pod netns is gone is torn down as its DEL would tear it down (VFs back to the host
//! and their pool, delegates' DEL releasing IPs, dataplane slots dropped, the record
//! removed), and VF state no record holds is released.
//!
//! It runs as root against live pods, so it is slow to act: a netns must be seen gone
//! at two sweeps in a row (with the same path), a container whose request is under way
//! is left for the next sweep, and every teardown is logged with the container and why.

use super::Engine;
use crate::records::Record;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// What a sweep saw at a record's netns path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsSeen {
    /// A network namespace is there.
    There,
    /// Nothing is there, or something that is not a network namespace: why.
    Gone(&'static str),
    /// It could not be told (no path recorded, or an error other than "not found"):
    /// treated as there.
    Unknown(String),
}

/// Looks at a pod's netns path as ADD and DEL open it (through the host's root when
/// the agent runs in a container with `host_process`).
pub fn netns_seen(path: &str) -> NetnsSeen {
    if path.is_empty() {
        return NetnsSeen::Unknown("no netns recorded".into());
    }
    match crate::netns::open_path(Path::new(path)) {
        Ok(f) => match nix::sys::statfs::fstatfs(&f) {
            Ok(s) if s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC => NetnsSeen::There,
            // A file left where the runtime unmounted the netns (its removal failed).
            Ok(_) => NetnsSeen::Gone("path no longer a network namespace"),
            Err(e) => NetnsSeen::Unknown(format!("fstatfs: {e}")),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => NetnsSeen::Gone("path gone"),
        Err(e) => NetnsSeen::Unknown(e.to_string()),
    }
}

/// Pod netns paths seen gone at the last sweep, by container: only those still gone
/// at the next are torn down.
#[derive(Debug, Default)]
pub struct StaleSweep {
    gone: BTreeMap<String, String>,
    /// Containers torn down by this sweep since the agent started.
    pub recovered: u64,
}

/// What one sweep does with one record, from what it saw now and at the last sweep.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Its netns is there (or cannot be told): forgotten.
    Keep,
    /// Gone for the first time (or at another path than before): noted.
    Note,
    /// Gone at two sweeps in a row: torn down.
    TearDown(&'static str),
}

fn step(before: Option<&String>, netns: &str, seen: &NetnsSeen) -> Step {
    match seen {
        NetnsSeen::Gone(why) if before.is_some_and(|b| b == netns) => Step::TearDown(why),
        NetnsSeen::Gone(_) => Step::Note,
        NetnsSeen::There | NetnsSeen::Unknown(_) => Step::Keep,
    }
}

impl Engine {
    /// Sweeps every `period` (zero: never) on a thread of its own.
    pub fn start_stale_sweep(self: &Arc<Self>, period: Duration) {
        if period.is_zero() {
            tracing::info!("stale_sweep_secs = 0: no sweep for pods that vanished without DEL");
            return;
        }
        let e = Arc::clone(self);
        std::thread::Builder::new()
            .name("trellis-sweep".into())
            .spawn(move || {
                let mut state = StaleSweep::default();
                loop {
                    std::thread::sleep(period);
                    let went = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        e.sweep_stale(&mut state);
                        e.sweep_vf_state();
                    }));
                    if went.is_err() {
                        tracing::error!("sweep: internal error (a bug; please report it); sweeping again in {period:?}");
                    }
                    // What a burst of pods freed goes back to the system.
                    // SAFETY: malloc_trim(3) only releases free heap memory.
                    unsafe { libc::malloc_trim(0) };
                }
            })
            .expect("sweep thread");
    }

    /// One sweep for pods that vanished without DEL; returns the containers torn down.
    pub fn sweep_stale(&self, state: &mut StaleSweep) -> Vec<String> {
        let records = match self.records.list() {
            Ok((records, _corrupt)) => records,
            Err(e) => {
                tracing::warn!("sweep: cannot list attachment records: {e}");
                return Vec::new();
            }
        };
        let mut gone = BTreeMap::new();
        let mut swept = Vec::new();
        let mut noted = false;
        for r in records {
            let seen = netns_seen(&r.netns);
            match step(state.gone.get(&r.container_id), &r.netns, &seen) {
                Step::Keep => {}
                Step::Note => {
                    tracing::info!(container = %r.container_id, pod = %pod_of(&r), netns = %r.netns,
                        "sweep: pod netns {}; torn down at the next sweep if still so",
                        gone_why(&seen));
                    gone.insert(r.container_id.clone(), r.netns.clone());
                    noted = true;
                }
                Step::TearDown(why) => {
                    if self.tear_down_vanished(&r.container_id, &r.netns, why) {
                        swept.push(r.container_id.clone());
                    } else {
                        gone.insert(r.container_id.clone(), r.netns.clone());
                    }
                }
            }
        }
        if noted {
            // A socket the dataplane keeps in the last pod it worked on would keep a
            // deleted netns (and a VF in it) alive: let it go now, so the kernel has
            // given the VF back to the host by the next sweep.
            self.forget_pod_socket();
        }
        state.gone = gone;
        state.recovered += swept.len() as u64;
        swept
    }

    /// Tears down a container whose netns (`netns`) was seen gone twice, unless a
    /// request for it is under way or its record changed; true once it is gone.
    fn tear_down_vanished(&self, id: &str, netns: &str, why: &str) -> bool {
        // No GC while it runs (the two never tear down the same container at once),
        // held for this container only: a GC waiting for it holds up every request.
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        let Some(_lock) = self.locks.try_lock(id) else {
            tracing::info!(container = %id, "sweep: a request for it is under way; looked at again at the next sweep");
            return false;
        };
        // Read again under its lock: a DEL may have finished, an ADD may have started.
        let r = match self.records.load(id) {
            Ok(Some(r)) => r,
            Ok(None) => return true,
            Err(e) => {
                tracing::warn!(container = %id, "sweep: {e}");
                return false;
            }
        };
        if r.netns != netns || !matches!(netns_seen(&r.netns), NetnsSeen::Gone(_)) {
            return false;
        }
        // The path gone is not the netns gone (`ip netns delete` under a running pod,
        // a runtime that unmounted it early): torn down only once nothing is in it,
        // else its addresses, slots and VF would be taken from a live pod.
        match r.netns_inode.map(|ino| (ino, crate::netns::holder(ino))) {
            None => {
                tracing::warn!(container = %id, netns = %netns,
                    "sweep: netns path gone, but the record (from an older agent) has no netns inode to tell whether the netns lives on: kept; its DEL or GC releases it");
                return false;
            }
            Some((_, Some(holder))) => {
                tracing::warn!(container = %id, netns = %netns,
                    "sweep: netns path gone, but the netns lives on ({holder}): kept");
                return false;
            }
            Some((_, None)) => {}
        }
        let devices: Vec<&str> = r
            .attachments
            .iter()
            .filter_map(|a| a.device.as_deref())
            .collect();
        tracing::warn!(container = %id, pod = %pod_of(&r), netns = %netns, devices = ?devices,
            "sweep: pod vanished without DEL (netns {why} at two sweeps in a row): tearing down its attachments as its DEL would");
        let failures = self.tear_down(r, "", false);
        if failures.is_empty() {
            tracing::info!(container = %id, "sweep: torn down, record removed");
            true
        } else {
            tracing::warn!(container = %id, "sweep: teardown incomplete (retried at the next sweep): {}", failures.join("; "));
            false
        }
    }

    /// VF state files no record holds, released (as at start-up) while requests run.
    pub fn sweep_vf_state(&self) -> Vec<String> {
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        self.sriov
            .sweep_locked(&self.records, |id| self.locks.try_lock(id))
    }
}

fn pod_of(r: &Record) -> String {
    format!("{}/{}", r.pod_namespace, r.pod_name)
}

fn gone_why(seen: &NetnsSeen) -> &'static str {
    match seen {
        NetnsSeen::Gone(why) => why,
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netns_is_gone_only_when_nothing_or_no_netns_is_there() {
        assert_eq!(netns_seen("/proc/self/ns/net"), NetnsSeen::There);
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("cni-1234");
        assert_eq!(
            netns_seen(&missing.to_string_lossy()),
            NetnsSeen::Gone("path gone")
        );
        let file = d.path().join("cni-5678");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(
            netns_seen(&file.to_string_lossy()),
            NetnsSeen::Gone("path no longer a network namespace")
        );
        assert!(matches!(netns_seen(""), NetnsSeen::Unknown(_)));
        // A path through a regular file cannot be told: kept.
        assert!(matches!(
            netns_seen(&file.join("x").to_string_lossy()),
            NetnsSeen::Unknown(_)
        ));
    }

    #[test]
    fn only_a_netns_gone_at_two_sweeps_in_a_row_is_torn_down() {
        let gone = NetnsSeen::Gone("path gone");
        let p = "/run/netns/a".to_string();
        assert_eq!(step(None, &p, &gone), Step::Note);
        assert_eq!(step(Some(&p), &p, &gone), Step::TearDown("path gone"));
        // Another path than the one seen gone (an ADD again with a new netns): noted.
        assert_eq!(step(Some(&"/run/netns/b".into()), &p, &gone), Step::Note);
        assert_eq!(step(Some(&p), &p, &NetnsSeen::There), Step::Keep);
        assert_eq!(
            step(Some(&p), &p, &NetnsSeen::Unknown("EACCES".into())),
            Step::Keep
        );
    }

    fn engine(dir: &Path) -> Engine {
        let config = crate::config::AgentConfig::parse(
            &format!(
                "state_dir = {:?}\nsysfs_root = {:?}\ndefault_network = \"/d.conflist\"\n[networks]\nsource = \"files\"\ndir = {:?}\n",
                dir.join("state"),
                dir.join("sys"),
                dir.join("nads")
            ),
            Path::new("t.toml"),
        )
        .unwrap();
        let source = Arc::new(crate::source::files::FileSource::new(dir.join("nads")));
        Engine::new(&config, source).unwrap()
    }

    fn record(id: &str, netns: &str) -> Record {
        Record {
            container_id: id.into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            pod_namespace: "pods".into(),
            pod_name: id.into(),
            pod_uid: String::new(),
            cni_args: String::new(),
            attachments: Vec::new(),
            network_status: None,
            added_at_ms: Some(1),
            networks: None,
            choices: None,
            static_networks: false,
            // An inode no process or mount holds.
            netns_inode: Some(u64::MAX - 1),
        }
    }

    #[test]
    fn a_vanished_pod_is_torn_down_at_the_second_sweep_and_never_while_busy() {
        let d = tempfile::tempdir().unwrap();
        let e = engine(d.path());
        let gone = d.path().join("netns-gone").to_string_lossy().into_owned();
        e.records.save(&record("vanished", &gone)).unwrap();
        e.records.save(&record("busy", &gone)).unwrap();
        e.records
            .save(&record("live", "/proc/self/ns/net"))
            .unwrap();
        let ids = |e: &Engine| {
            let mut v: Vec<String> = e
                .records
                .list()
                .unwrap()
                .0
                .into_iter()
                .map(|r| r.container_id)
                .collect();
            v.sort();
            v
        };
        let mut state = StaleSweep::default();
        assert!(e.sweep_stale(&mut state).is_empty(), "seen gone once");
        assert_eq!(ids(&e), ["busy", "live", "vanished"]);
        let held = e.locks.try_lock("busy").unwrap();
        assert_eq!(e.sweep_stale(&mut state), ["vanished"]);
        assert_eq!(ids(&e), ["busy", "live"], "a request for busy is under way");
        drop(held);
        assert_eq!(e.sweep_stale(&mut state), ["busy"]);
        assert_eq!(ids(&e), ["live"]);
        assert_eq!(state.recovered, 2);
        assert!(e.sweep_stale(&mut state).is_empty());
        assert_eq!(ids(&e), ["live"]);
    }
}
