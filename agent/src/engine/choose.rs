//! Choosing a network for a pod's `trellis.dev/network-choice` entry: every candidate
//! read and checked (it exists, the pod's namespace may use it, its capacity and cost
//! annotations are valid), its figures on this node taken, and the policy's pick
//! planned as any other network.

use super::{from_record_err, from_source_err, invalid, Engine, Planned};
use crate::choice::kpi::{self, NetworkKpi};
use crate::choice::spec::{self, Choice, Chosen, Policy};
use crate::records::Record;
use crate::selection::NetworkSelection;
use trellis_cni::CniError;

/// Each network's measured (rx, tx) bits per second.
type Rates = std::collections::BTreeMap<String, (f64, f64)>;

/// What this node alone knows of `network`: its attachments and measured rates.
fn kpi_base(network: &str, records: &[Record], rates: &Rates) -> NetworkKpi {
    let (rx_bps, tx_bps) = rates.get(network).copied().unwrap_or_default();
    NetworkKpi {
        network: network.to_string(),
        attachments: records
            .iter()
            .flat_map(|r| r.attachments.iter())
            .filter(|a| a.network == network)
            .count(),
        rx_bps,
        tx_bps,
        ..Default::default()
    }
}

impl Engine {
    /// The figures of each of `networks` (`namespace/name`) on this node; a NAD that
    /// cannot be read gets what the node alone knows (its attachments and rates).
    pub fn network_kpis(&self, networks: &[String]) -> Result<Vec<NetworkKpi>, CniError> {
        let (records, _) = self.records.list().map_err(from_record_err)?;
        Ok(self.network_kpis_in(&records, networks))
    }

    /// `network_kpis` with this node's records read already.
    pub fn network_kpis_in(&self, records: &[Record], networks: &[String]) -> Vec<NetworkKpi> {
        // One walk over the samples for every network asked about.
        let rates = self.kpi.rates();
        networks
            .iter()
            .map(|n| {
                let nad = n
                    .split_once('/')
                    .and_then(|(ns, name)| self.source.get_nad(ns, name).ok());
                match nad {
                    Some(nad) => self
                        .kpi_of(&nad, records, &rates)
                        .unwrap_or_else(|_| kpi_base(n, records, &rates)),
                    None => kpi_base(n, records, &rates),
                }
            })
            .collect()
    }

    /// Every network with an attachment on this node, and every candidate of a choice
    /// a pod here made.
    pub fn known_networks(&self) -> Result<Vec<String>, CniError> {
        let (records, _) = self.records.list().map_err(from_record_err)?;
        let mut out: Vec<String> = records
            .iter()
            .flat_map(|r| r.attachments.iter())
            .flat_map(|a| {
                std::iter::once(a.network.clone())
                    .chain(a.chosen.iter().flat_map(|c| c.choice.from.iter().cloned()))
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// A NAD's figures on this node; a capacity or cost annotation that is not valid
    /// is an error naming it.
    fn kpi_of(
        &self,
        nad: &crate::nad::NetworkAttachmentDefinition,
        records: &[Record],
        rates: &Rates,
    ) -> Result<NetworkKpi, String> {
        let network = nad.qualified_name();
        let mut k = kpi_base(&network, records, rates);
        let ann = |key: &str| nad.metadata.annotations.get(key);
        if let Some(c) = ann(spec::CAPACITY_ANNOTATION) {
            let cap = spec::parse_capacity(c).ok_or_else(|| {
                format!(
                    "NetworkAttachmentDefinition {network}: annotation {}: {c:?} is not a capacity in bits per second (\"10G\", \"100M\", \"2500\")",
                    spec::CAPACITY_ANNOTATION
                )
            })?;
            k.capacity_bps = Some(cap);
            k.utilization = Some(k.bps() / cap as f64);
        }
        if let Some(c) = ann(spec::COST_ANNOTATION) {
            k.cost = Some(spec::parse_cost(c).ok_or_else(|| {
                format!(
                    "NetworkAttachmentDefinition {network}: annotation {}: {c:?} is not a number >= 0",
                    spec::COST_ANNOTATION
                )
            })?);
        }
        if let Ok(conf) = nad.conf_list() {
            k.free_addresses = kpi::free_addresses(&conf.to_value(), records);
        }
        if let (Some(pools), Some(resource)) = (&self.device_pools, nad.resource_name()) {
            let pools = pools.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(devices) = pools.devices.get(resource) {
                let used = |id: &str| {
                    records
                        .iter()
                        .flat_map(|r| r.attachments.iter())
                        .any(|a| a.device.as_deref() == Some(id))
                };
                k.free_devices = Some(
                    devices
                        .iter()
                        .filter(|d| d.health.is_ok() && !used(&d.id))
                        .count() as u64,
                );
            }
        }
        Ok(k)
    }

    /// Picks the network for `choice` (entry `index` of the pod's annotation), for a
    /// pod of `pod_ns`: the selection to plan, and the record of the choice.
    pub(crate) fn choose(
        &self,
        choice: &Choice,
        index: usize,
        pod_ns: &str,
    ) -> Result<(NetworkSelection, Chosen), CniError> {
        let at = format!("annotation {}[{index}]", spec::CHOICE_ANNOTATION);
        if matches!(choice.by, Policy::LeastUtilized | Policy::Cheapest) && self.dataplane.is_none()
        {
            return Err(invalid(format!(
                "{at}.by: {} needs the rates the eBPF dataplane measures, and it is off ({})",
                choice.by.name(),
                self.dataplane_off
            )));
        }
        let (records, _) = self.records.list().map_err(from_record_err)?;
        let rates = self.kpi.rates();
        let mut kpis = Vec::new();
        for (j, sel) in choice.candidates().iter().enumerate() {
            let nad = self
                .source
                .get_nad(&sel.namespace, &sel.name)
                .map_err(|e| {
                    let mut e = from_source_err(e);
                    e.msg = format!("{at}.from[{j}]: {}", e.msg);
                    e
                })?;
            self.namespaces.check(pod_ns, &nad).map_err(|e| {
                invalid(format!(
                    "{at}.from[{j}]: network {}: {e}",
                    sel.qualified_name()
                ))
            })?;
            kpis.push(
                self.kpi_of(&nad, &records, &rates)
                    .map_err(|e| invalid(format!("{at}.from[{j}]: {e}")))?,
            );
        }
        let (pick, reason) =
            crate::choice::rank(choice.by, &kpis).map_err(|e| invalid(format!("{at}.by: {e}")))?;
        let mut sel = choice.candidates().swap_remove(pick);
        sel.interface = choice.interface.clone();
        Ok((
            sel,
            Chosen {
                choice: choice.clone(),
                reason,
                at: k8s_openapi::jiff::Timestamp::now().to_string(),
                retiring: false,
            },
        ))
    }

    /// `choose`, planned: the chosen network as a planned attachment.
    pub(crate) fn plan_choice(
        &self,
        choice: &Choice,
        index: usize,
        pod_ns: &str,
    ) -> Result<Planned, CniError> {
        let (sel, chosen) = self.choose(choice, index, pod_ns)?;
        let mut p = self.plan_selection(sel.clone(), sel, pod_ns)?;
        p.chosen = Some(chosen);
        Ok(p)
    }
}
