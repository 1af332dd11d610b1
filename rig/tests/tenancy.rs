//! Which pods may use which NADs, through the real shim and agent: with
//! `namespace_isolation`, a pod uses its own namespace's NADs and the global
//! namespaces' only, through the networks annotation and the default-network
//! annotation alike; a NAD's `trellis.dev/allowed-namespaces` binds pods of other
//! namespaces whatever the node's setting. A refused ADD names the rule and leaves
//! nothing in the pod.

use serde_json::json;
use std::collections::BTreeMap;
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode};
use trellis_rig::require_root;

fn add(
    node: &TestNode,
    id: &str,
    pod_ns: &str,
    ann: &BTreeMap<String, String>,
) -> (Netns, Result<(), String>) {
    let ns = Netns::new("trt");
    let out = node.shim(
        "ADD",
        id,
        &ns.path().to_string_lossy(),
        (pod_ns, id),
        &node.shim_conf(Some(ann)),
    );
    let r = if out.ok {
        Ok(())
    } else {
        Err(out.expect_err("ADD").1)
    };
    (ns, r)
}

#[test]
fn namespace_isolation_and_allowed_namespaces() {
    require_root!();
    let mut node = TestNode::new();
    node.top_toml = "namespace_isolation = true\nglobal_namespaces = [\"shared\"]\n".into();
    let conf = |subnet: &str| node.macvlan_conf(subnet);
    node.add_nad("team-a", "own", &conf("10.78.20.0/24"));
    node.add_nad("team-b", "theirs", &conf("10.78.21.0/24"));
    node.add_nad("shared", "common", &conf("10.78.22.0/24"));
    let allowed: BTreeMap<String, String> = [(
        "trellis.dev/allowed-namespaces".to_string(),
        json!(["team-c"]).to_string(),
    )]
    .into();
    node.add_nad_annotated("shared", "restricted", &conf("10.78.23.0/24"), &allowed);
    node.start_agent();

    // Its own namespace's and a global namespace's NADs: attached.
    let (ns, r) = add(
        &node,
        "a1",
        "team-a",
        &networks_annotation("own, shared/common"),
    );
    assert!(r.is_ok(), "{r:?}\n{}", node.agent_log());
    assert!(ns.links().contains(&"net2".to_string()), "{:?}", ns.links());

    // Another tenant's NAD: refused by name, nothing made.
    let (ns, r) = add(
        &node,
        "a2",
        "team-a",
        &networks_annotation("own, team-b/theirs"),
    );
    let msg = r.unwrap_err();
    assert!(
        msg.contains("namespace_isolation")
            && msg.contains("team-b/theirs")
            && msg.contains("\"team-a\""),
        "{msg}"
    );
    assert!(ns.links().is_empty(), "{:?}", ns.links());
    assert!(!node.records().contains(&"a2".to_string()));

    // The default-network annotation is held to the same rule (Multus does not).
    let ann: BTreeMap<String, String> = [(
        "v1.multus-cni.io/default-network".to_string(),
        "team-b/theirs".to_string(),
    )]
    .into();
    let (ns, r) = add(&node, "a3", "team-a", &ann);
    let msg = r.unwrap_err();
    assert!(
        msg.contains("namespace_isolation") && msg.contains("default network"),
        "{msg}"
    );
    assert!(ns.links().is_empty());

    // A global NAD that names the namespaces allowed to use it: team-a is not one.
    let (_, r) = add(
        &node,
        "a4",
        "team-a",
        &networks_annotation("shared/restricted"),
    );
    let msg = r.unwrap_err();
    assert!(
        msg.contains("trellis.dev/allowed-namespaces") && msg.contains("team-c"),
        "{msg}"
    );
    let (_, r) = add(
        &node,
        "c1",
        "team-c",
        &networks_annotation("shared/restricted"),
    );
    assert!(r.is_ok(), "{r:?}");
}
