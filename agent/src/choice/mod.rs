//! Choosing a network by measured load: the `trellis.dev/network-choice` annotation
//! (`spec`), the figures each candidate is judged by (`kpi`), and the ranking.

pub mod kpi;
pub mod spec;

use kpi::NetworkKpi;
use spec::Policy;

/// The candidate `policy` picks out of `kpis` (in the pod's order; ties go to the
/// earlier), with why; or why none can be picked.
pub fn rank(policy: Policy, kpis: &[NetworkKpi]) -> Result<(usize, String), String> {
    // Utilization where every candidate has a capacity, else the measured rate.
    let all_capacity = kpis.iter().all(|k| k.utilization.is_some());
    let load = |k: &NetworkKpi| {
        if all_capacity {
            k.utilization.unwrap_or(f64::INFINITY)
        } else {
            k.bps()
        }
    };
    let describe = |k: &NetworkKpi| {
        if all_capacity {
            format!("{} utilization {:.3}", k.network, load(k))
        } else {
            format!("{} {:.0} bit/s", k.network, load(k))
        }
    };
    let lowest = |key: &dyn Fn(&NetworkKpi) -> (f64, f64)| {
        let mut best = 0;
        for i in 1..kpis.len() {
            if key(&kpis[i]) < key(&kpis[best]) {
                best = i;
            }
        }
        best
    };
    let list =
        |f: &dyn Fn(&NetworkKpi) -> String| kpis.iter().map(f).collect::<Vec<_>>().join(", ");
    match policy {
        Policy::LeastUtilized => {
            let i = lowest(&|k| (load(k), 0.0));
            Ok((i, format!("least utilized: {}", list(&describe))))
        }
        Policy::MostFreeAddresses => {
            if kpis.iter().all(|k| k.free_addresses.is_none()) {
                return Err("most-free-addresses: no candidate has host-local IPAM whose free addresses this node can count".into());
            }
            let i = lowest(&|k| (-(k.free_addresses.map_or(-1.0, |f| f as f64)), 0.0));
            Ok((
                i,
                format!(
                    "most free addresses: {}",
                    list(&|k| format!(
                        "{} {}",
                        k.network,
                        k.free_addresses.map_or("unknown".into(), |f| f.to_string())
                    ))
                ),
            ))
        }
        Policy::MostFreeDevices => {
            if kpis.iter().all(|k| k.free_devices.is_none()) {
                return Err("most-free-devices: no candidate is backed by a device pool of this node (k8s.v1.cni.cncf.io/resourceName)".into());
            }
            let i = lowest(&|k| (-(k.free_devices.map_or(-1.0, |f| f as f64)), 0.0));
            Ok((
                i,
                format!(
                    "most free devices: {}",
                    list(&|k| format!(
                        "{} {}",
                        k.network,
                        k.free_devices.map_or("unknown".into(), |f| f.to_string())
                    ))
                ),
            ))
        }
        Policy::Cheapest => {
            if kpis.iter().all(|k| k.cost.is_none()) {
                return Err(format!(
                    "cheapest: no candidate has a {} annotation",
                    spec::COST_ANNOTATION
                ));
            }
            let i = lowest(&|k| (k.cost.unwrap_or(f64::INFINITY), load(k)));
            Ok((
                i,
                format!(
                    "cheapest: {}",
                    list(&|k| format!(
                        "{} cost {}",
                        k.network,
                        k.cost.map_or("none".into(), |c| c.to_string())
                    ))
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(network: &str, bps: f64, cap: Option<u64>) -> NetworkKpi {
        NetworkKpi {
            network: network.into(),
            rx_bps: bps,
            capacity_bps: cap,
            utilization: cap.map(|c| bps / c as f64),
            ..Default::default()
        }
    }

    #[test]
    fn least_utilized_by_capacity_when_all_have_one() {
        let kpis = [k("a", 500.0, Some(1000)), k("b", 800.0, Some(10_000))];
        assert_eq!(rank(Policy::LeastUtilized, &kpis).unwrap().0, 1);
        // One without a capacity: raw rates.
        let kpis = [k("a", 500.0, Some(1000)), k("b", 800.0, None)];
        assert_eq!(rank(Policy::LeastUtilized, &kpis).unwrap().0, 0);
        // Ties go to the earlier candidate.
        let kpis = [k("a", 0.0, None), k("b", 0.0, None)];
        assert_eq!(rank(Policy::LeastUtilized, &kpis).unwrap().0, 0);
    }

    #[test]
    fn cheapest_breaks_ties_by_load_and_needs_a_cost() {
        let mut a = k("a", 900.0, None);
        let mut b = k("b", 100.0, None);
        let mut c = k("c", 0.0, None);
        a.cost = Some(1.0);
        b.cost = Some(1.0);
        c.cost = Some(2.0);
        let (i, why) = rank(Policy::Cheapest, &[a, b, c]).unwrap();
        assert_eq!(i, 1, "{why}");
        assert!(rank(Policy::Cheapest, &[k("a", 0.0, None)]).is_err());
    }

    #[test]
    fn most_free_addresses_and_devices() {
        let mut a = k("a", 0.0, None);
        let mut b = k("b", 0.0, None);
        a.free_addresses = Some(10);
        b.free_addresses = Some(200);
        a.free_devices = Some(3);
        assert_eq!(
            rank(Policy::MostFreeAddresses, &[a.clone(), b.clone()])
                .unwrap()
                .0,
            1
        );
        assert_eq!(rank(Policy::MostFreeDevices, &[b.clone(), a]).unwrap().0, 1);
        assert!(rank(Policy::MostFreeDevices, &[b]).is_err());
    }
}
