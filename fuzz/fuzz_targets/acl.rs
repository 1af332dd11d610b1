//! The `trellis.dev/acl` annotation: no input panics; a rejection names the
//! annotation (and the rule); an accepted ACL compiles into tables whose lookups
//! agree with the rules' definition for a few addresses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use trellis_agent::acl::Acl;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Acl::parse(text) {
        Ok(acl) => {
            let _ = acl.tables();
            let _ = acl.digest();
            for remote in [
                "10.0.0.1",
                "0.0.0.0",
                "255.255.255.255",
                "fd00::1",
                "::",
                "ffff::1",
            ] {
                let ip = remote.parse().unwrap();
                for dir in [0, 1] {
                    for (proto, port) in [(6, Some(22)), (17, Some(53)), (1, None), (58, None)] {
                        if let Some(i) = acl.decide(dir, ip, proto, port) {
                            assert!(i < acl.rules.len());
                        }
                    }
                }
            }
        }
        Err(e) => assert!(
            e.to_string().starts_with("annotation trellis.dev/acl: "),
            "{e}"
        ),
    }
});
