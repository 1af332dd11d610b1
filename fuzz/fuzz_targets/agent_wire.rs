//! The agent socket's wire format, end to end through the agent's request handler (no
//! delegate can run: the node's default network names a plugin that is not there, and
//! no NAD exists): no request panics the agent or goes unanswered; every error answer
//! is CNI error JSON with a code and a message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use trellis_agent::config::AgentConfig;
use trellis_agent::source::files::FileSource;
use trellis_agent::verbs::Handler;

fn handler() -> &'static Handler {
    static H: OnceLock<(tempfile::TempDir, Handler)> = OnceLock::new();
    &H.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir");
        let nads = d.path().join("nads");
        std::fs::create_dir(&nads).unwrap();
        let default = d.path().join("default.conf");
        std::fs::write(&default, r#"{"cniVersion":"1.0.0","name":"cluster","type":"nosuchplugin"}"#).unwrap();
        let toml = format!(
            "state_dir = {:?}\ncni_bin_dirs = [{:?}]\ndefault_network = {:?}\n[dataplane]\nenabled = false\n[metrics]\nlisten = \"\"\n[networks]\nsource = \"files\"\ndir = {:?}\n",
            d.path().join("state"),
            d.path().join("bin"),
            default,
            nads,
        );
        let config = AgentConfig::parse(&toml, std::path::Path::new("agent.toml")).unwrap();
        let h = Handler::new(&config, Arc::new(FileSource::new(&nads))).unwrap();
        (d, h)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<trellis_shim::wire::Request>(data) else {
        return;
    };
    let resp = handler().handle(&req);
    if !resp.ok {
        let e: trellis_cni::CniError =
            serde_json::from_str(&resp.stdout).unwrap_or_else(|e| panic!("{e}: {}", resp.stdout));
        assert!(e.code > 0 && !e.msg.is_empty(), "{}", resp.stdout);
    }
});
