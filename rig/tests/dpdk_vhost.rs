//! vhost-user sockets made by a real DPDK switch (testpmd, `net_vhost`): discovered,
//! healthy while testpmd listens, unhealthy once it exits.

use std::time::Duration;
use trellis_device_plugin::api::deviceplugin as dp;
use trellis_device_plugin::manager::{self, Settings};
use trellis_rig::dpdk::Testpmd;
use trellis_rig::fake_kubelet::{watch_until, FakeKubelet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testpmd_sockets_are_devices_with_health() {
    trellis_rig::require_root!();
    let dir = tempfile::tempdir().unwrap();
    let sockets = dir.path().join("vhost");
    std::fs::create_dir_all(&sockets).unwrap();
    let socket = sockets.join("vhu-a.sock");
    let mut testpmd = Testpmd::vhost_server(&socket, &dir.path().join("testpmd.log"));

    let cfg = dir.path().join("pools.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"resourceList":[{{"resourceName":"vhu","resourcePrefix":"trellis.dev","deviceType":"vhostUser",
                "mountPath":"/var/run/vhost","selectors":{{"socketDirs":[{:?}],"namePattern":"vhu-*.sock"}}}}]}}"#,
            sockets
        ),
    )
    .unwrap();

    // The CLI sees it, healthy.
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["devices", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "vhostUser")
        .expect("socket listed");
    assert_eq!(row["path"], socket.display().to_string());
    assert_eq!(row["health"], "ok");
    assert_eq!(row["pool"], "trellis.dev/vhu");

    let plugin_dir = dir.path().join("device-plugins");
    let kubelet = FakeKubelet::start(&plugin_dir);
    let mut s = Settings::new(&cfg);
    s.plugin_dir = plugin_dir;
    s.sysfs_root = "/nonexistent-unused".into();
    let _m = manager::start(s).expect("manager");
    let regs = kubelet.wait_registrations(1, Duration::from_secs(10)).await;
    let mut client = kubelet.plugin(&regs[0].request.endpoint).await;
    let mut stream = client
        .list_and_watch(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    let (list, _) = watch_until(&mut stream, Duration::from_secs(10), |l| l.len() == 1).await;
    assert_eq!(list[0].id, socket.display().to_string());
    assert_eq!(list[0].health, "Healthy");

    let alloc = client
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec![list[0].id.clone()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let c = &alloc.container_responses[0];
    assert_eq!(c.mounts[0].host_path, sockets.display().to_string());
    assert_eq!(
        c.envs["TRELLIS_VHOST_USER_TRELLIS_DEV_VHU"],
        "/var/run/vhost/vhu-a.sock"
    );

    testpmd.stop();
    let (list, _) = watch_until(&mut stream, Duration::from_secs(10), |l| {
        l.iter().all(|d| d.health == "Unhealthy")
    })
    .await;
    assert_eq!(list.len(), 1, "the device stays listed, unhealthy");
}
