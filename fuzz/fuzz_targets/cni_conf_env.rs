//! What a runtime hands a plugin: the CNI_* environment and the network config on
//! stdin, as the shim and the agent read them. The input is env lines, a blank line,
//! then stdin. No input panics; a bad environment is error 4 naming the variable, a
//! bad config names the config.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (env_text, stdin) = text.split_once("\n\n").unwrap_or((text, ""));
    let vars: BTreeMap<String, String> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match trellis_cni::CniEnv::from_vars(&vars) {
        Ok(env) => {
            if !env.container_id.is_empty() {
                trellis_cni::env::validate_container_id(&env.container_id).expect("accepted id");
            }
            let _ = env.args.to_string();
        }
        Err(e) => {
            assert_eq!(e.code, 4, "{e}");
            assert!(e.msg.contains("CNI_"), "{e}");
        }
    }
    match trellis_cni::NetConfList::parse(stdin.as_bytes(), None) {
        Ok(list) => {
            let _ = list.to_value();
            let _ = list.version();
        }
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.starts_with("network config")
                    || m.contains("cniVersion")
                    || m.contains("supported"),
                "{m}"
            );
        }
    }
    let _ = trellis_cni::CniResult::from_value(&serde_json::from_str(stdin).unwrap_or_default());
});
