//! The attachment records journal as an agent killed at any byte leaves it: loading
//! never panics; a journal is either read (its newest complete snapshot) or reported
//! corrupt by path; a save after any tail is read back.
#![no_main]
use libfuzzer_sys::fuzz_target;
use trellis_agent::records::RecordStore;

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::tempdir().expect("tempdir");
    }
    DIR.with(|dir| {
        let store = RecordStore::open(dir.path()).expect("store");
        let path = dir.path().join("containers/c1.json");
        std::fs::write(&path, data).expect("write");
        let before = match store.load("c1") {
            Ok(r) => r,
            Err(e) => {
                assert!(e.to_string().contains("c1.json"), "{e}");
                None
            }
        };
        let mut r = before.unwrap_or(trellis_agent::records::Record {
            container_id: "c1".into(),
            netns: String::new(),
            ifname: "eth0".into(),
            pod_namespace: String::new(),
            pod_name: String::new(),
            pod_uid: String::new(),
            cni_args: String::new(),
            attachments: vec![],
            network_status: None,
            added_at_ms: None,
            networks: None,
            choices: None,
            static_networks: false,
            netns_inode: None,
        });
        r.container_id = "c1".into();
        r.pod_name = "after".into();
        store.save(&r).expect("save");
        assert_eq!(
            store.load("c1").expect("load").expect("saved").pod_name,
            "after"
        );
    });
});
