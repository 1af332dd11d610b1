//! sriov-network-device-plugin's config.json as the node admin writes it: no input
//! panics; every rejection names the place in the config.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = trellis_device_plugin::config::DeviceConfig::parse(text, "intel.com") {
        assert!(e.to_string().starts_with("device config"), "{e}");
    }
});
