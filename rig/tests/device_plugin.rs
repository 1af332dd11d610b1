//! The device-plugin manager against a test kubelet written from the API definitions:
//! registration, ListAndWatch with health, GetPreferredAllocation, Allocate, kubelet
//! restarts, devices and config changing under it; and the PodResources client.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;
use trellis_device_plugin::api::deviceplugin as dp;
use trellis_device_plugin::manager::{self, ManagerHandle, Settings};
use trellis_devices::fixture::{FixtureSysfs, Pf};
use trellis_rig::fake_kubelet::{pod_with_devices, serve_pod_resources, watch_until, FakeKubelet};

const WAIT: Duration = Duration::from_secs(10);

struct Rig {
    fx: FixtureSysfs,
    dir: tempfile::TempDir,
    vhost_dir: PathBuf,
    _vhost: Vec<UnixListener>,
}

impl Rig {
    fn new() -> Rig {
        let fx = FixtureSysfs::new();
        fx.add_pf(&Pf {
            address: "0000:3b:00.0",
            netdev: "ens1f0",
            numa: 0,
            vfs: 4,
            ..Pf::igb()
        });
        fx.add_pf(&Pf {
            address: "0000:af:00.0",
            netdev: "ens2f0",
            numa: 1,
            vfs: 2,
            ..Pf::igb()
        });
        fx.bind("0000:af:10.0", "vfio-pci");
        fx.bind("0000:af:10.2", "vfio-pci");
        let dir = tempfile::tempdir().unwrap();
        let vhost_dir = dir.path().join("vhost");
        std::fs::create_dir_all(&vhost_dir).unwrap();
        let vhost = vec![
            UnixListener::bind(vhost_dir.join("vhu0.sock")).unwrap(),
            UnixListener::bind(vhost_dir.join("vhu1.sock")).unwrap(),
        ];
        let rig = Rig {
            fx,
            dir,
            vhost_dir,
            _vhost: vhost,
        };
        rig.write_config(&rig.config(false));
        rig
    }

    fn config(&self, extra_pool: bool) -> String {
        let extra = if extra_pool {
            r#",{"resourceName":"f0_high","selectors":{"pfNames":["ens1f0#2-3"]}}"#
        } else {
            ""
        };
        let f0 = if extra_pool { "ens1f0#0-1" } else { "ens1f0" };
        format!(
            r#"{{"resourceList":[
                {{"resourceName":"netdev","selectors":{{"pfNames":["{f0}"],"devices":["10ca"]}}}},
                {{"resourceName":"dpdk","resourcePrefix":"trellis.dev","selectors":{{"drivers":["vfio-pci"]}}}},
                {{"resourceName":"vhu","resourcePrefix":"trellis.dev","deviceType":"vhostUser","mountPath":"/var/run/vhu",
                  "selectors":{{"socketDirs":[{:?}],"namePattern":"vhu*"}}}}{extra}]}}"#,
            self.vhost_dir
        )
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config/config.json")
    }

    /// Replaced atomically, as editors and ConfigMap updates do.
    fn write_config(&self, text: &str) {
        let p = self.config_path();
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    fn plugin_dir(&self) -> PathBuf {
        self.dir.path().join("device-plugins")
    }

    /// An agent.toml (files source, no dataplane) whose `[devices]` reads
    /// `devices_config`; the default network and NAD dir it names are made too.
    fn write_agent_toml(&self, devices_config: &Path) -> PathBuf {
        let d = self.dir.path();
        std::fs::create_dir_all(d.join("nads")).unwrap();
        std::fs::write(
            d.join("default.conflist"),
            r#"{"cniVersion":"1.0.0","name":"c","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(
            d.join("agent.toml"),
            format!(
                "socket = {:?}\nstate_dir = {:?}\ndefault_network = {:?}\n[dataplane]\nenabled = false\n[metrics]\nlisten = \"\"\n[networks]\nsource = \"files\"\ndir = {:?}\n[devices]\nconfig = {:?}\nplugin_dir = {:?}\npoll_interval_ms = 200\n",
                d.join("cni.sock"),
                d.join("state"),
                d.join("default.conflist"),
                d.join("nads"),
                devices_config,
                self.plugin_dir()
            ),
        )
        .unwrap();
        d.join("agent.toml")
    }

    fn start(&self) -> ManagerHandle {
        let mut s = Settings::new(self.config_path());
        s.sysfs_root = self.fx.root().to_path_buf();
        s.plugin_dir = self.plugin_dir();
        manager::start(s).expect("start device plugin manager")
    }
}

fn endpoint_of(regs: &[trellis_rig::fake_kubelet::Registration], resource: &str) -> String {
    regs.iter()
        .rev()
        .find(|r| r.request.resource_name == resource)
        .unwrap_or_else(|| panic!("{resource} never registered: {regs:#?}"))
        .request
        .endpoint
        .clone()
}

fn ids(list: &[dp::Device]) -> Vec<&str> {
    list.iter().map(|d| d.id.as_str()).collect()
}

fn health<'a>(list: &'a [dp::Device], id: &str) -> &'a str {
    &list
        .iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("{id} not listed"))
        .health
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_register_and_serve_devices_allocations_and_preferences() {
    let rig = Rig::new();
    let kubelet = FakeKubelet::start(&rig.plugin_dir());
    let _m = rig.start();
    let regs = kubelet.wait_registrations(3, WAIT).await;
    let mut names: Vec<&str> = regs
        .iter()
        .map(|r| r.request.resource_name.as_str())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["intel.com/netdev", "trellis.dev/dpdk", "trellis.dev/vhu"]
    );
    for r in &regs {
        assert_eq!(r.request.version, "v1beta1");
        assert!(rig.plugin_dir().join(&r.request.endpoint).exists(), "{r:?}");
        assert!(
            r.request
                .options
                .as_ref()
                .unwrap()
                .get_preferred_allocation_available
        );
    }

    // netdev pool: the four igbvf VFs of ens1f0, with NUMA 0.
    let mut netdev = kubelet
        .plugin(&endpoint_of(&regs, "intel.com/netdev"))
        .await;
    let opts = netdev
        .get_device_plugin_options(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert!(opts.get_preferred_allocation_available && !opts.pre_start_required);
    let mut stream = netdev
        .list_and_watch(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    let (list, _) = watch_until(&mut stream, WAIT, |_| true).await;
    assert_eq!(
        ids(&list),
        [
            "0000:3b:10.0",
            "0000:3b:10.2",
            "0000:3b:10.4",
            "0000:3b:10.6"
        ]
    );
    assert!(list.iter().all(|d| d.health == "Healthy"));
    assert_eq!(list[0].topology.as_ref().unwrap().nodes[0].id, 0);

    let pref = netdev
        .get_preferred_allocation(dp::PreferredAllocationRequest {
            container_requests: vec![dp::ContainerPreferredAllocationRequest {
                available_device_i_ds: vec![
                    "0000:3b:10.6".into(),
                    "0000:3b:10.2".into(),
                    "0000:3b:10.4".into(),
                ],
                must_include_device_i_ds: vec!["0000:3b:10.4".into()],
                allocation_size: 2,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pref.container_responses[0].device_i_ds,
        ["0000:3b:10.4", "0000:3b:10.2"]
    );

    let alloc = netdev
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["0000:3b:10.0".into(), "0000:3b:10.2".into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let c = &alloc.container_responses[0];
    assert_eq!(
        c.envs["PCIDEVICE_INTEL_COM_NETDEV"],
        "0000:3b:10.0,0000:3b:10.2"
    );
    assert!(c.devices.is_empty() && c.mounts.is_empty());
    let err = netdev
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["0000:af:10.0".into()],
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("0000:af:10.0 is not in pool intel.com/netdev"),
        "{err}"
    );

    // dpdk pool: vfio device nodes.
    let mut dpdk = kubelet
        .plugin(&endpoint_of(&regs, "trellis.dev/dpdk"))
        .await;
    let alloc = dpdk
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["0000:af:10.2".into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let c = &alloc.container_responses[0];
    assert_eq!(c.envs["PCIDEVICE_TRELLIS_DEV_DPDK"], "0000:af:10.2");
    assert_eq!(c.devices[0].host_path, "/dev/vfio/vfio");
    assert!(c.devices[1].host_path.starts_with("/dev/vfio/"));
    assert_eq!(c.devices[1].permissions, "rw");

    // vhost-user pool: the socket dir mounted, the path in the container in env.
    let mut vhu = kubelet.plugin(&endpoint_of(&regs, "trellis.dev/vhu")).await;
    let sock = rig.vhost_dir.join("vhu1.sock").display().to_string();
    let alloc = vhu
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec![sock.clone()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let c = &alloc.container_responses[0];
    assert_eq!(c.mounts[0].host_path, rig.vhost_dir.display().to_string());
    assert_eq!(c.mounts[0].container_path, "/var/run/vhu");
    assert_eq!(
        c.envs["TRELLIS_VHOST_USER_TRELLIS_DEV_VHU"],
        "/var/run/vhu/vhu1.sock"
    );
    assert_eq!(c.envs["PCIDEVICE_TRELLIS_DEV_VHU"], sock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_vf_changes_reach_list_and_watch() {
    let mut rig = Rig::new();
    let kubelet = FakeKubelet::start(&rig.plugin_dir());
    let _m = rig.start();
    let regs = kubelet.wait_registrations(3, WAIT).await;
    let mut netdev = kubelet
        .plugin(&endpoint_of(&regs, "intel.com/netdev"))
        .await;
    let mut stream = netdev
        .list_and_watch(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    watch_until(&mut stream, WAIT, |l| l.len() == 4).await;

    // A VF loses its driver: unhealthy, still listed.
    rig.fx.unbind("0000:3b:10.2");
    let (list, _) = watch_until(&mut stream, WAIT, |l| {
        l.iter().any(|d| d.health == "Unhealthy")
    })
    .await;
    assert_eq!(health(&list, "0000:3b:10.2"), "Unhealthy");
    assert_eq!(health(&list, "0000:3b:10.0"), "Healthy");
    rig.fx.bind("0000:3b:10.2", "igbvf");
    watch_until(&mut stream, WAIT, |l| {
        l.iter().all(|d| d.health == "Healthy")
    })
    .await;

    // sriov_numvfs changes: the pool follows.
    let pf = Pf {
        address: "0000:3b:00.0",
        netdev: "ens1f0",
        numa: 0,
        vfs: 4,
        ..Pf::igb()
    };
    rig.fx.set_num_vfs(&pf, 6);
    let (list, _) = watch_until(&mut stream, WAIT, |l| l.len() == 6).await;
    assert_eq!(list[5].id, "0000:3b:11.2");
    rig.fx.set_num_vfs(&pf, 1);
    let (list, _) = watch_until(&mut stream, WAIT, |l| l.len() == 1).await;
    assert_eq!(ids(&list), ["0000:3b:10.0"]);

    // A vhost-user switch goes away: its sockets turn unhealthy.
    let mut vhu = kubelet.plugin(&endpoint_of(&regs, "trellis.dev/vhu")).await;
    let mut vstream = vhu.list_and_watch(dp::Empty {}).await.unwrap().into_inner();
    watch_until(&mut vstream, WAIT, |l| {
        l.len() == 2 && l.iter().all(|d| d.health == "Healthy")
    })
    .await;
    rig._vhost.clear();
    std::fs::remove_file(rig.vhost_dir.join("vhu0.sock")).unwrap();
    let (list, _) = watch_until(&mut vstream, WAIT, |l| {
        l.iter().all(|d| d.health == "Unhealthy")
    })
    .await;
    assert_eq!(list.len(), 2, "a vanished socket stays listed, unhealthy");
    // It comes back on the same path.
    let _back = UnixListener::bind(rig.vhost_dir.join("vhu0.sock")).unwrap();
    let (list, _) = watch_until(&mut vstream, WAIT, |l| {
        l.iter().any(|d| d.health == "Healthy")
    })
    .await;
    assert_eq!(
        health(
            &list,
            &rig.vhost_dir.join("vhu0.sock").display().to_string()
        ),
        "Healthy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_restart_gets_every_pool_registered_again() {
    let rig = Rig::new();
    let mut kubelet = FakeKubelet::start(&rig.plugin_dir());
    let m = rig.start();
    kubelet.wait_registrations(3, WAIT).await;
    for round in 1..=2 {
        let restarted = kubelet.restart();
        let regs = kubelet.wait_registrations(3 * (round + 1), WAIT).await;
        let took = regs.last().unwrap().at - restarted;
        eprintln!(
            "round {round}: every pool registered again {took:?} after kubelet.sock came back"
        );
        // The plugin sockets kubelet removed are back and serve.
        let mut netdev = kubelet
            .plugin(&endpoint_of(&regs, "intel.com/netdev"))
            .await;
        let mut stream = netdev
            .list_and_watch(dp::Empty {})
            .await
            .unwrap()
            .into_inner();
        watch_until(&mut stream, WAIT, |l| l.len() == 4).await;
    }
    assert_eq!(m.status().registrations["intel.com/netdev"], 3);
}

/// kubelet.sock deleted and created again, the plugin sockets left in place: every
/// pool registers again each time (in ms; printed), also when ext4 gave the new socket
/// the old one's inode number (the manager once told kubelets apart by inode alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_kubelet_socket_gets_every_pool_registered_again() {
    let rig = Rig::new();
    let mut kubelet = FakeKubelet::start(&rig.plugin_dir());
    let m = rig.start();
    kubelet.wait_registrations(3, WAIT).await;
    const ROUNDS: usize = 25;
    let (mut reused, mut took) = (0, Vec::new());
    for round in 1..=ROUNDS {
        let (at, same_inode) = kubelet.recreate_socket();
        reused += same_inode as usize;
        // A missed restart never registers again: WAIT (not the ~ms it takes, a
        // figure printed below) tells the two apart on a loaded machine too.
        let regs = kubelet.wait_registrations(3 * (round + 1), WAIT).await;
        let last = &regs[3 * round..];
        let mut pools: Vec<&str> = last
            .iter()
            .map(|r| r.request.resource_name.as_str())
            .collect();
        pools.sort();
        assert_eq!(
            pools,
            ["intel.com/netdev", "trellis.dev/dpdk", "trellis.dev/vhu"],
            "round {round} (inode reused: {same_inode})"
        );
        took.push(last.iter().map(|r| r.at - at).max().unwrap());
    }
    took.sort();
    eprintln!(
        "re-created kubelet.sock, {ROUNDS} rounds ({reused} with the inode reused): every pool registered again in median {:?}, max {:?}",
        took[ROUNDS / 2],
        took[ROUNDS - 1]
    );
    // The case this test is for: on ext4 (where kubelet's dir lives, and this
    // machine's /tmp) a freed inode number comes back.
    let on_ext4 = nix::sys::statfs::statfs(&rig.plugin_dir())
        .map(|s| s.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC)
        .unwrap_or(false);
    if on_ext4 {
        assert!(
            reused > 0,
            "no round reused the inode: the aliasing case went untested"
        );
    }
    assert_eq!(
        m.status().registrations["intel.com/netdev"],
        ROUNDS as u64 + 1
    );
    // Nothing registered twice for one kubelet.
    assert_eq!(kubelet.registrations().len(), 3 * (ROUNDS + 1));
}

/// The device-plugins dir itself removed and made again (its inotify watch goes with
/// it): watched again once it is back, and the kubelet there gets every pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_plugin_dir_is_watched_again() {
    let rig = Rig::new();
    let mut kubelet = FakeKubelet::start(&rig.plugin_dir());
    let _m = rig.start();
    kubelet.wait_registrations(3, WAIT).await;
    kubelet.stop();
    // The manager binds its sockets again as it sees them go: retried until the dir
    // is gone (and then it cannot).
    let mut tries = 0;
    while let Err(e) = std::fs::remove_dir_all(rig.plugin_dir()) {
        tries += 1;
        assert!(tries < 50, "cannot remove the plugin dir: {e}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::create_dir_all(rig.plugin_dir()).unwrap();
    let kubelet = FakeKubelet::start(&rig.plugin_dir());
    kubelet.wait_registrations(3, WAIT).await;
    // And a kubelet restart after that is seen by the new watch.
    let mut kubelet = kubelet;
    kubelet.recreate_socket();
    kubelet.wait_registrations(6, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_add_pools_and_bad_edits_keep_the_old_ones() {
    let rig = Rig::new();
    let kubelet = FakeKubelet::start(&rig.plugin_dir());
    let m = rig.start();
    let regs = kubelet.wait_registrations(3, WAIT).await;
    let mut netdev = kubelet
        .plugin(&endpoint_of(&regs, "intel.com/netdev"))
        .await;
    let mut stream = netdev
        .list_and_watch(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    watch_until(&mut stream, WAIT, |l| l.len() == 4).await;

    // ens1f0 split in two pools: the old one shrinks, a new one registers.
    rig.write_config(&rig.config(true));
    let regs = kubelet.wait_registrations(4, WAIT).await;
    assert_eq!(regs[3].request.resource_name, "intel.com/f0_high");
    let (list, _) = watch_until(&mut stream, WAIT, |l| l.len() == 2).await;
    assert_eq!(ids(&list), ["0000:3b:10.0", "0000:3b:10.2"]);
    let mut high = kubelet.plugin(&regs[3].request.endpoint).await;
    let mut hs = high
        .list_and_watch(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    let (list, _) = watch_until(&mut hs, WAIT, |_| true).await;
    assert_eq!(ids(&list), ["0000:3b:10.4", "0000:3b:10.6"]);

    // A broken edit: logged, pools unchanged.
    rig.write_config(
        r#"{"resourceList":[{"resourceName":"x","selectors":{"pfNames":["ens1f0#9-1"]}}]}"#,
    );
    let deadline = std::time::Instant::now() + WAIT;
    while m.status().last_error.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "bad config never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = m.status().last_error.unwrap();
    assert!(
        err.contains("runs backwards") && err.contains("config.json"),
        "{err}"
    );
    assert_eq!(m.status().devices.len(), 4);
    assert!(rig.plugin_dir().join(&regs[3].request.endpoint).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_name_the_problem() {
    let rig = Rig::new();
    rig.write_config(
        r#"{"resourceList":[{"resourceName":"a","selectors":{"vendors":["80867"]}}]}"#,
    );
    let mut s = Settings::new(rig.config_path());
    s.sysfs_root = rig.fx.root().to_path_buf();
    s.plugin_dir = rig.plugin_dir();
    let err = manager::start(s)
        .err()
        .expect("a bad config must not start")
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("vendors[0]"),
        "{err}"
    );
    rig.write_config(&rig.config(false));
    let mut s = Settings::new(rig.config_path());
    s.sysfs_root = Path::new("/nonexistent-sysfs").into();
    s.plugin_dir = rig.plugin_dir();
    let err = manager::start(s).err().unwrap().to_string();
    assert!(err.contains("/nonexistent-sysfs/bus/pci/devices"), "{err}");
    // Nothing was left listening.
    assert!(
        std::fs::read_dir(rig.plugin_dir())
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_resources_tell_which_devices_a_pod_got() {
    use trellis_device_plugin::podresources::{pod_devices, PodResourcesError};
    let d = tempfile::tempdir().unwrap();
    let pods = vec![
        pod_with_devices("ns1", "a", "intel.com/netdev", &["0000:3b:10.2"]),
        pod_with_devices(
            "ns1",
            "b",
            "trellis.dev/dpdk",
            &["0000:af:10.0", "0000:af:10.2"],
        ),
    ];
    for get in [true, false] {
        let sock = d.path().join(format!("pr-{get}.sock"));
        let _srv = serve_pod_resources(&sock, pods.clone(), get);
        assert_eq!(
            pod_devices(&sock, "ns1", "a", "intel.com/netdev")
                .await
                .unwrap(),
            ["0000:3b:10.2"]
        );
        assert_eq!(
            pod_devices(&sock, "ns1", "b", "trellis.dev/dpdk")
                .await
                .unwrap(),
            ["0000:af:10.0", "0000:af:10.2"]
        );
        assert!(pod_devices(&sock, "ns1", "b", "intel.com/netdev")
            .await
            .unwrap()
            .is_empty());
        let e = pod_devices(&sock, "ns1", "zz", "intel.com/netdev")
            .await
            .unwrap_err();
        assert!(
            matches!(e, PodResourcesError::NoPod(ref p) if p == "ns1/zz"),
            "{e}"
        );
    }
    let e = pod_devices(&d.path().join("absent.sock"), "ns1", "a", "x")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("absent.sock"), "{e}");
}

/// The agent process with a `[devices]` table: its pools register; a bad pool config
/// keeps it from starting, with the file and field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_pools_from_its_config() {
    let rig = Rig::new();
    let d = rig.dir.path();
    rig.write_agent_toml(&rig.config_path());
    let kubelet = FakeKubelet::start(&rig.plugin_dir());
    let mut agent = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["agent", "--config"])
        .arg(d.join("agent.toml"))
        .arg("--sysfs-root")
        .arg(rig.fx.root())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let regs = kubelet.wait_registrations(3, WAIT).await;
    let mut netdev = kubelet
        .plugin(&endpoint_of(&regs, "intel.com/netdev"))
        .await;
    let mut stream = netdev
        .list_and_watch(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    watch_until(&mut stream, WAIT, |l| l.len() == 4).await;
    agent.kill().unwrap();
    agent.wait().unwrap();

    std::fs::write(d.join("bad.json"), r#"{"resourceList":[{"resourceName":"a","deviceType":"auxNetDevice","selectors":{"vendors":["8086"]}}]}"#).unwrap();
    rig.write_agent_toml(&d.join("bad.json"));
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["agent", "--config"])
        .arg(d.join("agent.toml"))
        .arg("--sysfs-root")
        .arg(rig.fx.root())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.json") && err.contains("deviceType: \"auxNetDevice\" is not supported"),
        "{err}"
    );
}

/// What a plugin socket did with one raw HTTP/2 gRPC call.
#[derive(Debug, PartialEq)]
enum H2Outcome {
    Answered,
    Reset(u32),
}

/// One gRPC call written frame by frame, so the `:authority` can be what any kubelet
/// sent (no HTTP library would send a path there). HPACK literals without indexing.
fn raw_h2_call(socket: &Path, authority: &str, path: &str) -> H2Outcome {
    use std::io::{Read, Write};
    fn int(out: &mut Vec<u8>, mut n: usize) {
        // HPACK integer with a 7-bit prefix, no Huffman flag.
        if n < 127 {
            out.push(n as u8);
            return;
        }
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128 + 128) as u8);
            n /= 128;
        }
        out.push(n as u8);
    }
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }
    let mut block = Vec::new();
    for (k, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0);
        int(&mut block, k.len());
        block.extend(k.as_bytes());
        int(&mut block, v.len());
        block.extend(v.as_bytes());
    }
    let mut c = std::os::unix::net::UnixStream::connect(socket).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out.extend(frame(1, 0x4, 1, &block));
    out.extend(frame(0, 0x1, 1, &[0, 0, 0, 0, 0]));
    c.write_all(&out).unwrap();
    loop {
        let mut head = [0u8; 9];
        c.read_exact(&mut head).expect("an answer to the call");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        c.read_exact(&mut payload).unwrap();
        match kind {
            4 if flags & 1 == 0 => c.write_all(&frame(4, 1, 0, &[])).unwrap(),
            1 if stream == 1 => return H2Outcome::Answered,
            3 if stream == 1 => {
                return H2Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()))
            }
            7 => return H2Outcome::Reset(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
            _ => {}
        }
    }
}

/// kubelet 1.26 and later call plugins with `:authority: localhost` (kubernetes PR
/// 112597); older ones sent the socket's path, which is not an authority and which
/// the HTTP/2 server refuses as a malformed request (PROTOCOL_ERROR). docs/devices.md
/// states 1.26 as the minimum kubelet; this pins both halves of that statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_with_kubelet_126_authority_are_served_a_socket_path_authority_is_refused() {
    let rig = Rig::new();
    let kubelet = FakeKubelet::start(&rig.plugin_dir());
    let _m = rig.start();
    let regs = kubelet.wait_registrations(3, WAIT).await;
    let socket = rig
        .plugin_dir()
        .join(endpoint_of(&regs, "intel.com/netdev"));
    let call = "/v1beta1.DevicePlugin/GetDevicePluginOptions";
    let s = socket.clone();
    let (localhost, path) = tokio::task::spawn_blocking(move || {
        (
            raw_h2_call(&s, "localhost", call),
            raw_h2_call(&s, &s.display().to_string(), call),
        )
    })
    .await
    .unwrap();
    assert_eq!(localhost, H2Outcome::Answered);
    assert_eq!(path, H2Outcome::Reset(1), "PROTOCOL_ERROR");
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/devices.md"))
            .unwrap();
    assert!(
        docs.contains("kubelet 1.26"),
        "docs/devices.md states the minimum kubelet"
    );
}

/// SIGTERM (kubelet stopping the DaemonSet's pod, systemd) stops the agent cleanly and
/// takes its plugin sockets out of kubelet's dir; kubelet's own socket stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_no_plugin_socket_behind() {
    let rig = Rig::new();
    let config = rig.write_agent_toml(&rig.config_path());
    let kubelet = FakeKubelet::start(&rig.plugin_dir());
    let mut agent = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["agent", "--config"])
        .arg(&config)
        .arg("--sysfs-root")
        .arg(rig.fx.root())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    kubelet.wait_registrations(3, WAIT).await;
    let plugin_sockets = || -> Vec<String> {
        std::fs::read_dir(rig.plugin_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "kubelet.sock")
            .collect()
    };
    assert_eq!(plugin_sockets().len(), 3, "{:?}", plugin_sockets());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = agent.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = agent.kill();
            panic!("the agent did not stop within {WAIT:?} of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("SIGTERM: stopping"), "{log}");
    assert_eq!(plugin_sockets(), Vec::<String>::new(), "{log}");
    assert!(rig.plugin_dir().join("kubelet.sock").exists());
}

/// A VF the CNI side moved into a pod has no netdev in the host's view: still healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vfs_placed_in_pods_stay_healthy() {
    let rig = Rig::new();
    let kubelet = FakeKubelet::start(&rig.plugin_dir());
    let claims = trellis_devices::VfClaims::under(rig.dir.path());
    std::fs::create_dir_all(claims.dir()).unwrap();
    std::fs::write(claims.path("0000:3b:10.0"), "{}").unwrap();
    let mut s = Settings::new(rig.config_path());
    s.sysfs_root = rig.fx.root().to_path_buf();
    s.plugin_dir = rig.plugin_dir();
    s.vf_claims = Some(claims);
    let _m = manager::start(s).unwrap();
    let regs = kubelet.wait_registrations(3, WAIT).await;
    let mut netdev = kubelet
        .plugin(&endpoint_of(&regs, "intel.com/netdev"))
        .await;
    let mut stream = netdev
        .list_and_watch(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    watch_until(&mut stream, WAIT, |l| l.len() == 4).await;
    rig.fx.remove_netdevs("0000:3b:10.0");
    rig.fx.remove_netdevs("0000:3b:10.2");
    let (list, _) = watch_until(&mut stream, WAIT, |l| {
        l.iter().any(|d| d.health == "Unhealthy")
    })
    .await;
    assert_eq!(
        health(&list, "0000:3b:10.0"),
        "Healthy",
        "in a pod, by the record"
    );
    assert_eq!(health(&list, "0000:3b:10.2"), "Unhealthy");
}
