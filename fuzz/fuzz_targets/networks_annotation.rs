//! The pod's `k8s.v1.cni.cncf.io/networks` annotation (comma and JSON forms) and the
//! default-network override: no input panics; every rejection names the annotation,
//! and every accepted selection has an interface name the kernel takes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use trellis_agent::selection::{parse_default_network, parse_networks};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_networks(text, "pods", "eth0") {
        Ok(list) => {
            for s in list {
                trellis_cni::env::validate_ifname(&s.interface)
                    .unwrap_or_else(|e| panic!("accepted interface {:?}: {e}", s.interface));
                assert_ne!(
                    s.interface, "eth0",
                    "the cluster network's interface reused"
                );
                assert!(!s.namespace.is_empty() && !s.name.is_empty());
            }
        }
        Err(e) => assert!(
            e.to_string()
                .starts_with("annotation k8s.v1.cni.cncf.io/networks: "),
            "{e}"
        ),
    }
    if let Err(e) = parse_default_network(text, "pods") {
        assert!(
            e.to_string()
                .starts_with("annotation v1.multus-cni.io/default-network: "),
            "{e}"
        );
    }
});
