//! A panic inside a request is answered as a CNI error and an ADD that panicked is
//! undone (its delegates DEL'd, its record gone); the agent keeps answering.
//! Unprivileged: the delegate is a script that logs what it is asked.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use trellis_agent::config::AgentConfig;
use trellis_agent::nad::NetworkAttachmentDefinition;
use trellis_agent::source::{NetworkSource, PodRef, SourceError};
use trellis_agent::verbs::Handler;
use trellis_shim::wire::Request;

/// A source with no NADs whose network-status write panics (a bug stand-in).
struct PanickingSource;

impl NetworkSource for PanickingSource {
    fn get_nad(&self, ns: &str, name: &str) -> Result<NetworkAttachmentDefinition, SourceError> {
        Err(SourceError::NadNotFound {
            name: format!("{ns}/{name}"),
            hint: String::new(),
        })
    }

    fn logical_nads(&self) -> Result<Vec<NetworkAttachmentDefinition>, SourceError> {
        Ok(Vec::new())
    }

    fn pod_annotations(
        &self,
        _: &PodRef,
        _: Option<&BTreeMap<String, String>>,
    ) -> Result<BTreeMap<String, String>, SourceError> {
        Ok(BTreeMap::new())
    }

    fn publish_network_status(&self, _: &PodRef, _: &str) -> Result<(), SourceError> {
        panic!("publishing network-status blew up");
    }

    fn ready(&self) -> Result<(), SourceError> {
        Ok(())
    }
}

fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn request(cmd: &str, container: &str) -> Request {
    let env = BTreeMap::from([
        ("CNI_COMMAND".to_string(), cmd.to_string()),
        ("CNI_CONTAINERID".to_string(), container.to_string()),
        ("CNI_NETNS".to_string(), "/proc/self/ns/net".to_string()),
        ("CNI_IFNAME".to_string(), "eth0".to_string()),
        (
            "CNI_ARGS".to_string(),
            "K8S_POD_NAMESPACE=pods;K8S_POD_NAME=p".to_string(),
        ),
    ]);
    Request {
        env,
        stdin: r#"{"cniVersion":"1.0.0","name":"trellis","type":"trellis-cni"}"#.into(),
    }
}

#[test]
fn a_panicking_add_is_answered_and_undone() {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = d.path().join("log");
    script(
        &bin.join("logger"),
        &format!(
            r#"cat >/dev/null; echo "$CNI_COMMAND $CNI_CONTAINERID" >> {}
[ "$CNI_COMMAND" = ADD ] && echo '{{"cniVersion":"1.0.0","interfaces":[{{"name":"eth0"}}]}}'
exit 0"#,
            log.display()
        ),
    );
    let default = d.path().join("default.conf");
    std::fs::write(
        &default,
        r#"{"cniVersion":"1.0.0","name":"cluster","type":"logger"}"#,
    )
    .unwrap();
    let toml = format!(
        "state_dir = {:?}\ncni_bin_dirs = [{:?}]\ndefault_network = {:?}\n[dataplane]\nenabled = false\n[metrics]\nlisten = \"\"\n[networks]\nsource = \"files\"\ndir = {:?}\n",
        d.path().join("state"),
        bin,
        default,
        d.path().join("nads"),
    );
    let config = AgentConfig::parse(&toml, Path::new("agent.toml")).unwrap();
    let h = Handler::new(&config, Arc::new(PanickingSource)).unwrap();

    let resp = h.handle(&request("ADD", "c1"));
    assert!(!resp.ok, "{}", resp.stdout);
    let err: serde_json::Value = serde_json::from_str(&resp.stdout).unwrap();
    assert_eq!(err["code"], 5, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("blew up"), "{err}");
    // The delegate that ran was DEL'd and nothing is recorded.
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ADD c1\nDEL c1\n");
    assert!(h.records().load("c1").unwrap().is_none());
    // The agent goes on answering (no lock left held).
    let resp = h.handle(&request("DEL", "c1"));
    assert!(resp.ok, "{}", resp.stdout);
}
