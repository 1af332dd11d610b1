//! The `k8s.v1.cni.cncf.io/network-status` value (NPWG spec v1.3, section 4.1.2),
//! built from the attachments' results.

use crate::records::Attachment;
use serde_json::{json, Value};
use trellis_cni::CniResult;

/// One entry per attachment that finished ADD, in attachment order.
pub fn build(attachments: &[Attachment]) -> Value {
    let route_override = attachments.iter().any(|a| !a.default_route.is_empty());
    let entries: Vec<Value> = attachments
        .iter()
        .filter_map(|a| {
            let result = CniResult::from_value(a.result.as_ref()?).ok()?;
            Some(entry(a, &result, route_override))
        })
        .collect();
    Value::Array(entries)
}

fn entry(a: &Attachment, result: &CniResult, route_override: bool) -> Value {
    let iface = result
        .interfaces
        .iter()
        .position(|i| i.name == a.ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()));
    let ips: Vec<String> = result
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == iface)
        .map(|ip| ip.address.split('/').next().unwrap_or_default().to_string())
        .collect();
    let mut e = json!({
        "name": a.network,
        "interface": a.ifname,
        "ips": ips,
    });
    if let Some(mac) = iface.and_then(|i| result.interfaces[i].mac.clone()) {
        e["mac"] = json!(mac);
    }
    let is_default = if route_override {
        !a.default_route.is_empty()
    } else {
        a.cluster_default
    };
    if is_default {
        e["default"] = json!(true);
    }
    e["dns"] = serde_json::to_value(&result.dns).expect("dns serialises");
    let info = iface
        .and_then(|i| device_info(a, &result.interfaces[i]))
        .or_else(|| a.device.as_deref().map(|d| device_info_of(a, d)));
    if let Some(info) = info {
        e["device-info"] = info;
    }
    if let Some(at) = &a.attached_at {
        e[ATTACHED_AT] = json!(at);
    }
    if let Some(c) = &a.chosen {
        e[CHOSEN_BY] = json!({
            "policy": c.choice.by.name(),
            "from": c.choice.from,
            "reason": c.reason,
            "at": c.at,
        });
    }
    e
}

/// On an entry whose network a choice picked (`trellis.dev/network-choice`): the
/// policy, the candidates, why, when.
pub const CHOSEN_BY: &str = "trellis.dev/chosen-by";

/// On an entry added to the running pod (hot-plug): when, RFC 3339.
pub const ATTACHED_AT: &str = "trellis.dev/attached-at";

/// device-info for a pool device recorded on the attachment (results before 1.1.0
/// cannot carry it): a socket path, or a PCI address.
fn device_info_of(a: &Attachment, device: &str) -> Value {
    if device.starts_with('/') {
        vhost_info(a, device)
    } else {
        json!({"type": "pci", "version": "1.1.0", "pci": {"pci-address": device}})
    }
}

/// vhost-user device-info: the socket as the pod sees it; the pod is the client of the
/// switch's server socket.
fn vhost_info(a: &Attachment, socket: &str) -> Value {
    let plugin = a
        .conf
        .get("plugins")
        .and_then(Value::as_array)
        .and_then(|p| {
            p.iter()
                .find(|p| p["type"] == crate::kinds::vhostuser::TYPE)
        })
        .cloned()
        .unwrap_or(Value::Null);
    let path = crate::kinds::vhostuser::container_path(&plugin, socket);
    json!({"type": "vhost-user", "version": "1.1.0", "vhost-user": {"mode": "client", "path": path}})
}

/// NPWG device-info for interfaces that carry a device (CNI 1.1 pciID/socketPath).
fn device_info(a: &Attachment, i: &trellis_cni::result::Interface) -> Option<Value> {
    if let Some(pci) = &i.pci_id {
        return Some(json!({"type": "pci", "version": "1.1.0", "pci": {"pci-address": pci}}));
    }
    i.socket_path.as_ref().map(|p| vhost_info(a, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(network: &str, ifname: &str, default: bool, result: Value) -> Attachment {
        Attachment {
            network: network.into(),
            ifname: ifname.into(),
            cluster_default: default,
            conf: json!({}),
            runtime_config: Default::default(),
            result: Some(result),
            default_route: vec![],
            device: None,
            slot: None,
            bandwidth: Default::default(),
            logical: None,
            physical: None,
            selection: None,
            attached_at: None,
            chosen: None,
        }
    }

    #[test]
    fn status_names_each_interface() {
        let a = att(
            "cluster",
            "eth0",
            true,
            json!({"cniVersion":"1.0.0",
                   "interfaces":[{"name":"cni0","mac":"00:00:00:00:00:01"},{"name":"eth0","mac":"02:00:00:00:00:02","sandbox":"/n"}],
                   "ips":[{"address":"10.0.0.2/24","interface":1}],"dns":{"nameservers":["10.0.0.10"]}}),
        );
        let b = att(
            "pods/data",
            "net1",
            false,
            json!({"cniVersion":"0.4.0","interfaces":[{"name":"net1","sandbox":"/n","pciID":"0000:00:01.1"}],
                   "ips":[{"version":"4","address":"192.168.1.2/24","interface":0}]}),
        );
        let s = build(&[a.clone(), b.clone()]);
        assert_eq!(s[0]["name"], "cluster");
        assert_eq!(s[0]["ips"], json!(["10.0.0.2"]));
        assert_eq!(s[0]["mac"], "02:00:00:00:00:02");
        assert_eq!(s[0]["default"], true);
        assert_eq!(s[0]["dns"]["nameservers"][0], "10.0.0.10");
        assert_eq!(s[1]["interface"], "net1");
        assert!(s[1].get("default").is_none());
        assert_eq!(s[1]["device-info"]["pci"]["pci-address"], "0000:00:01.1");
        let mut b2 = b;
        b2.default_route = vec!["192.168.1.1".parse().unwrap()];
        let s = build(&[a, b2]);
        assert!(s[0].get("default").is_none());
        assert_eq!(s[1]["default"], true);
    }
}
