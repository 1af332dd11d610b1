//! The mover: watches every chosen attachment whose choice says when to move
//! (`"move": {"when": ..., "min_dwell": ...}`) and, when the condition has held for the
//! dwell time, moves it to the candidate its policy picks (engine `move_begin`), then
//! removes the old interface after the grace period (`move_end`).
//!
//! No flapping: `utilization > X` starts counting when the chosen network's
//! utilization goes above X and stops only when it falls below 0.9 X (hysteresis); a
//! move needs the condition held for `min_dwell`, at least `min_dwell` since the
//! attachment was chosen or last moved, and a target whose own utilization is below
//! 0.9 X (a move that would not help is not made). `cheaper` needs a candidate cheaper
//! than the chosen one for `min_dwell`.

use crate::choice::kpi::NetworkKpi;
use crate::choice::spec::{MoveWhen, Policy};
use crate::engine::Engine;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The band below the threshold a network must fall into before it counts as fine
/// again, and a target must be in.
const HYSTERESIS: f64 = 0.9;

pub fn start(engine: Arc<Engine>, every: Duration, grace: Duration) {
    std::thread::Builder::new()
        .name("trellis-mover".into())
        .spawn(move || Mover::new(engine, grace).run(every))
        .expect("mover thread");
}

struct Mover {
    engine: Arc<Engine>,
    grace: Duration,
    /// Per (container, interface): since when its move condition holds.
    since: HashMap<(String, String), Instant>,
    /// Retiring interfaces and when they go.
    ending: HashMap<(String, String), Instant>,
}

impl Mover {
    fn new(engine: Arc<Engine>, grace: Duration) -> Mover {
        Mover {
            engine,
            grace,
            since: HashMap::new(),
            ending: HashMap::new(),
        }
    }

    fn run(mut self, every: Duration) {
        loop {
            std::thread::sleep(every);
            let went = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.end_due();
                self.pass()
            }));
            match went {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("mover: {}", e.msg),
                Err(_) => tracing::error!("mover: internal error (a bug; please report it)"),
            }
        }
    }

    /// Old interfaces whose grace is over go (and ones an earlier agent left).
    fn end_due(&mut self) {
        if let Ok(retiring) = self.engine.retiring() {
            for key in retiring {
                self.ending
                    .entry(key)
                    .or_insert_with(|| Instant::now() + self.grace);
            }
        }
        let now = Instant::now();
        let due: Vec<(String, String)> = self
            .ending
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            match self.engine.move_end(&key.0, &key.1) {
                Ok(()) => {
                    self.ending.remove(&key);
                }
                Err(e) => {
                    tracing::warn!(container = %key.0, ifname = %key.1, "removing a moved interface: {}", e.msg);
                    self.ending.insert(key, now + self.grace);
                }
            }
        }
    }

    fn pass(&mut self) -> Result<(), trellis_cni::CniError> {
        let (records, _) = self
            .engine
            .records
            .list()
            .map_err(crate::engine::from_record_err)?;
        let mut watched = Vec::new();
        // One set of figures per network per pass.
        let mut figures: HashMap<String, NetworkKpi> = HashMap::new();
        for r in records
            .iter()
            .filter(|r| r.added_at_ms.is_some() && !r.static_networks)
        {
            for a in &r.attachments {
                let Some(c) = a.chosen.as_ref().filter(|c| !c.retiring) else {
                    continue;
                };
                let Some(m) = &c.choice.r#move else { continue };
                let key = (r.container_id.clone(), a.ifname.clone());
                watched.push(key.clone());
                let missing: Vec<String> = c
                    .choice
                    .from
                    .iter()
                    .filter(|n| !figures.contains_key(*n))
                    .cloned()
                    .collect();
                for k in self.engine.network_kpis_in(&records, &missing) {
                    figures.insert(k.network.clone(), k);
                }
                let kpis: Vec<NetworkKpi> = c
                    .choice
                    .from
                    .iter()
                    .filter_map(|n| figures.get(n).cloned())
                    .collect();
                let Some(cur) = kpis.iter().find(|k| k.network == a.network) else {
                    continue;
                };
                let holds = match (m.when, self.since.contains_key(&key)) {
                    (MoveWhen::UtilizationAbove(x), false) => {
                        cur.utilization.is_some_and(|u| u > x)
                    }
                    (MoveWhen::UtilizationAbove(x), true) => {
                        cur.utilization.is_some_and(|u| u >= x * HYSTERESIS)
                    }
                    (MoveWhen::Cheaper, _) => cheaper(&kpis, cur).is_some(),
                };
                if !holds {
                    self.since.remove(&key);
                    continue;
                }
                let since = *self.since.entry(key.clone()).or_insert_with(Instant::now);
                let chosen_for = c
                    .at
                    .parse::<k8s_openapi::jiff::Timestamp>()
                    .ok()
                    .and_then(|t| {
                        let secs = k8s_openapi::jiff::Timestamp::now().as_second() - t.as_second();
                        u64::try_from(secs).ok()
                    })
                    .map(Duration::from_secs)
                    .unwrap_or(Duration::MAX);
                if since.elapsed() < m.min_dwell || chosen_for < m.min_dwell {
                    continue;
                }
                let target = match m.when {
                    MoveWhen::UtilizationAbove(x) => better(c.choice.by, &kpis, cur, x),
                    MoveWhen::Cheaper => cheaper(&kpis, cur),
                };
                let Some((target, why)) = target else {
                    continue;
                };
                let reason = match m.when {
                    MoveWhen::UtilizationAbove(x) => format!(
                        "utilization {:.3} above {x} for {}s; {why}",
                        cur.utilization.unwrap_or_default(),
                        since.elapsed().as_secs()
                    ),
                    MoveWhen::Cheaper => why,
                };
                let started = Instant::now();
                match self
                    .engine
                    .move_begin(&key.0, &key.1, &target, reason.clone())
                {
                    Ok(new) => {
                        tracing::info!(container = %key.0, from = %a.network, to = %target, old = %key.1, new = %new,
                            micros = started.elapsed().as_micros() as u64, %reason, "moved");
                        self.since.remove(&key);
                        self.ending.insert(key, Instant::now() + self.grace);
                    }
                    Err(e) => {
                        tracing::warn!(container = %key.0, ifname = %key.1, to = %target, "move failed (the attachment stays): {}", e.msg);
                        // Counted again from now: no retry storm.
                        self.since.insert(key, Instant::now());
                    }
                }
            }
        }
        self.since.retain(|k, _| watched.contains(k));
        Ok(())
    }
}

/// The candidate the choice's policy picks among the others whose utilization is
/// below the band (a move to a network as busy would not help); with why.
fn better(
    policy: Policy,
    kpis: &[NetworkKpi],
    cur: &NetworkKpi,
    x: f64,
) -> Option<(String, String)> {
    let others: Vec<NetworkKpi> = kpis
        .iter()
        .filter(|k| k.network != cur.network)
        .filter(|k| k.utilization.is_some_and(|u| u < x * HYSTERESIS))
        .cloned()
        .collect();
    if others.is_empty() {
        return None;
    }
    let (i, why) = crate::choice::rank(policy, &others).ok()?;
    Some((others[i].network.clone(), why))
}

/// The cheapest candidate cheaper than `cur` (ties by load), with why.
fn cheaper(kpis: &[NetworkKpi], cur: &NetworkKpi) -> Option<(String, String)> {
    let cost = cur.cost?;
    let others: Vec<NetworkKpi> = kpis
        .iter()
        .filter(|k| k.network != cur.network && k.cost.is_some_and(|c| c < cost))
        .cloned()
        .collect();
    if others.is_empty() {
        return None;
    }
    let (i, _) = crate::choice::rank(Policy::Cheapest, &others).ok()?;
    let t = &others[i];
    Some((
        t.network.clone(),
        format!(
            "{} costs {} against {cost} of {}",
            t.network,
            t.cost.unwrap_or_default(),
            cur.network
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: &str, u: Option<f64>, cost: Option<f64>) -> NetworkKpi {
        NetworkKpi {
            network: n.into(),
            utilization: u,
            capacity_bps: u.map(|_| 1000),
            cost,
            ..Default::default()
        }
    }

    #[test]
    fn a_move_goes_only_where_it_helps() {
        let kpis = [
            k("a", Some(0.95), None),
            k("b", Some(0.85), None),
            k("c", Some(0.2), None),
        ];
        let (t, _) = better(Policy::LeastUtilized, &kpis, &kpis[0], 0.8).unwrap();
        assert_eq!(t, "c");
        // b is inside the band below 0.8: not a target; without c, no move.
        assert!(better(Policy::LeastUtilized, &kpis[..2], &kpis[0], 0.8).is_none());
    }

    #[test]
    fn cheaper_needs_a_lower_cost() {
        let kpis = [
            k("a", None, Some(5.0)),
            k("b", None, Some(5.0)),
            k("c", None, Some(2.0)),
        ];
        assert_eq!(cheaper(&kpis, &kpis[0]).unwrap().0, "c");
        assert!(cheaper(&kpis, &kpis[2]).is_none());
        assert!(cheaper(&kpis[..2], &kpis[0]).is_none());
    }
}
