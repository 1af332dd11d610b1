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
        .args(["devices", "--json", "--device-config"])
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

/// The vhostuser network type through the real shim and agent: the socket kubelet
/// allocated to the pod comes back as the result's socketPath, network-status says
/// where the pod sees it, and a pod-side testpmd (virtio_user) on that socket links
/// up with the switch and sends it packets.
#[test]
fn a_vhost_user_network_hands_the_pod_its_socket() {
    trellis_rig::require_root!();
    use trellis_rig::node::TestNode;
    let mut node = TestNode::new();
    let sockets = node.path("vhost");
    std::fs::create_dir_all(&sockets).unwrap();
    let socket = sockets.join("vhu-p.sock");
    let mut switch = Testpmd::vhost_server(&socket, &node.path("switch.log"));
    node.top_toml = format!(
        "pod_resources_socket = {:?}\n",
        node.path("pod-resources.sock")
    );
    // The node's vhost-user pool: the agent hands out only sockets a pool serves.
    let pools = node.path("pools.json");
    std::fs::write(
        &pools,
        format!(
            r#"{{"resourceList":[{{"resourceName":"vhu","resourcePrefix":"trellis.dev","deviceType":"vhostUser",
                "selectors":{{"socketDirs":[{sockets:?}],"namePattern":"vhu-*.sock"}}}}]}}"#
        ),
    )
    .unwrap();
    node.devices_toml = Some(format!(
        "[devices]\nconfig = {pools:?}\nplugin_dir = {:?}\n",
        node.path("device-plugins")
    ));
    let nad = serde_json::json!({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "vhu-net", "namespace": "pods",
                     "annotations": {"k8s.v1.cni.cncf.io/resourceName": "trellis.dev/vhu"}},
        "spec": {"config": r#"{"cniVersion":"1.1.0","type":"vhostuser","name":"vhu-net"}"#},
    });
    std::fs::write(node.path("nads/pods-vhu-net.json"), nad.to_string()).unwrap();
    node.start_agent();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _pr = {
        let _g = rt.enter();
        trellis_rig::fake_kubelet::serve_pod_resources(
            &node.path("pod-resources.sock"),
            vec![trellis_rig::fake_kubelet::pod_with_devices(
                "pods",
                "a",
                "trellis.dev/vhu",
                &[&socket.display().to_string()],
            )],
            true,
        )
    };
    let pod = trellis_rig::netns::Netns::new("trp");
    let ann = std::collections::BTreeMap::from([(
        "k8s.v1.cni.cncf.io/networks".to_string(),
        "vhu-net".to_string(),
    )]);
    let mut conf = node.shim_conf(Some(&ann));
    conf["cniVersion"] = serde_json::json!("1.1.0");
    let ns = pod.path().to_string_lossy().into_owned();
    let r = node
        .shim("ADD", "c1", &ns, ("pods", "a"), &conf)
        .expect_ok("ADD");
    let iface = r["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "net1")
        .expect("net1");
    let socket_path = iface["socketPath"]
        .as_str()
        .expect("socketPath")
        .to_string();
    assert_eq!(socket_path, socket.display().to_string());
    let status = node.record("c1")["network_status"].clone();
    let entry = status
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["interface"] == "net1")
        .unwrap();
    assert_eq!(entry["device-info"]["type"], "vhost-user");
    assert_eq!(
        entry["device-info"]["vhost-user"]["path"],
        "/var/run/vhost-user/vhu-p.sock"
    );
    assert_eq!(entry["device-info"]["vhost-user"]["mode"], "client");

    let pod_side = Testpmd::virtio_user_burst(&socket_path, 4);
    switch.stop();
    let switch_log = std::fs::read_to_string(node.path("switch.log")).unwrap();
    assert!(
        switch_log.contains("virtio is now ready for processing"),
        "switch never linked up:\n{switch_log}\npod side:\n{pod_side}"
    );
    let rx: u64 = switch_log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RX-packets:"))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0);
    assert!(rx > 0, "the switch received nothing:\n{switch_log}");
    node.shim("DEL", "c1", &ns, ("pods", "a"), &conf)
        .expect_ok("DEL");
    assert!(node.records().is_empty());
}
