//! A NetworkAttachmentDefinition as a NAD author writes it (YAML or JSON): its delegate
//! config and its ACL annotation. No input panics; a config error names the NAD and
//! the config, an ACL error the annotation; an accepted config never names a plugin
//! by a path.
#![no_main]
use libfuzzer_sys::fuzz_target;
use trellis_agent::nad::NetworkAttachmentDefinition;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(nad) = serde_saphyr::from_str::<NetworkAttachmentDefinition>(text) else {
        return;
    };
    match nad.conf_list() {
        Ok(list) => {
            trellis_cni::conf::check_network_name(&list.name).expect("accepted name");
            // The node policy over any accepted config: an answer, never a panic; what
            // it accepts has only ASCII keys.
            if trellis_agent::config::NadPolicy::default()
                .check(&list)
                .is_ok()
            {
                fn ascii(v: &serde_json::Value) -> bool {
                    match v {
                        serde_json::Value::Object(m) => {
                            m.iter().all(|(k, v)| k.is_ascii() && ascii(v))
                        }
                        serde_json::Value::Array(a) => a.iter().all(ascii),
                        _ => true,
                    }
                }
                assert!(list
                    .plugins
                    .iter()
                    .all(|p| p.iter().all(|(k, v)| k.is_ascii() && ascii(v))));
            }
            for (i, p) in list.plugins.iter().enumerate() {
                let ty = list.plugin_type(i);
                trellis_cni::conf::check_plugin_name(ty).expect("accepted type is a bare name");
                if let Some(ipam) = p
                    .get("ipam")
                    .and_then(|v| v.get("type"))
                    .and_then(|v| v.as_str())
                {
                    trellis_cni::conf::check_plugin_name(ipam)
                        .expect("accepted ipam.type is a bare name");
                }
                let _ = list.plugin_stdin(i, &serde_json::Map::new(), None);
            }
        }
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.contains(&nad.qualified_name()) && m.contains("spec.config"),
                "{m}"
            );
        }
    }
    if let Err(e) = nad.acl() {
        assert!(
            e.to_string().starts_with("annotation trellis.dev/acl: "),
            "{e}"
        );
    }
});
