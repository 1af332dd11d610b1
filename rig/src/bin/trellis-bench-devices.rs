//! Device plugin figures: discovery of 1,024 VFs on 16 PFs in a fixture sysfs tree,
//! Allocate latency through gRPC, time from kubelet re-creating its socket to every
//! pool registered again, and from a VF losing its driver to the ListAndWatch update.
//! Prints figures; asserts nothing about speed. No root needed. `--quick` runs a few
//! rounds of each (the test suite uses it to keep the bench working).

use std::time::{Duration, Instant};
use trellis_device_plugin::api::deviceplugin as dp;
use trellis_device_plugin::config::{DeviceConfig, DEFAULT_PREFIX};
use trellis_device_plugin::manager::{self, Settings};
use trellis_device_plugin::pool::{self, Inventory};
use trellis_devices::fixture::{FixtureSysfs, Pf};
use trellis_devices::sysfs::Sysfs;
use trellis_rig::fake_kubelet::{watch_until, FakeKubelet};
use trellis_rig::figures::{ms, percentiles};

const PFS: u32 = 16;
const VFS_PER_PF: u32 = 64;

fn stats(v: Vec<f64>) -> String {
    let n = v.len();
    let [p50, p90, max] = percentiles(v, [0.5, 0.9, 1.0]);
    format!("median {p50:.3}, p90 {p90:.3}, max {max:.3} (n={n})")
}

fn big_tree() -> FixtureSysfs {
    let fx = FixtureSysfs::new();
    for i in 0..PFS {
        let addr = format!("0000:{:02x}:00.0", 0x20 + i);
        let netdev = format!("ens{i}f0");
        fx.add_pf(&Pf {
            address: &addr,
            netdev: &netdev,
            numa: (i % 2) as i32,
            total_vfs: VFS_PER_PF,
            vfs: VFS_PER_PF,
            ..Pf::igb()
        });
    }
    fx
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = |full: u32, few: u32| if quick { few } else { full };
    let fx = big_tree();
    let sysfs = Sysfs::new(fx.root());
    let config = DeviceConfig::parse(
        r#"{"resourceList":[
            {"resourceName":"low","selectors":{"pfNames":["ens0f0#0-31","ens1f0#0-31","ens2f0#0-31","ens3f0#0-31"]}},
            {"resourceName":"vf","selectors":{"vendors":["8086"],"devices":["10ca"]}}]}"#,
        DEFAULT_PREFIX,
    )
    .unwrap();
    println!(
        "trellis device bench: {PFS} PFs x {VFS_PER_PF} VFs = {} VFs in a fixture sysfs tree",
        PFS * VFS_PER_PF
    );

    let (mut disc, mut pools) = (vec![], vec![]);
    for _ in 0..n(30, 3) {
        let t = Instant::now();
        let devs = sysfs.discover().unwrap();
        disc.push(ms(t.elapsed()));
        assert_eq!(devs.len() as u32, PFS * (VFS_PER_PF + 1));
        let t = Instant::now();
        let p = pool::build(&config, &Inventory { pci: devs });
        pools.push(ms(t.elapsed()));
        assert_eq!(
            p[0].devices.len() + p[1].devices.len(),
            (PFS * VFS_PER_PF) as usize
        );
    }
    println!("discovery (ms): {}", stats(disc));
    println!("pool build, 2 pools (ms): {}", stats(pools));

    // The manager against the test kubelet, on the big tree.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        r#"{"resourceList":[{"resourceName":"vf","selectors":{"devices":["10ca"]}}]}"#,
    )
    .unwrap();
    let plugin_dir = dir.path().join("device-plugins");
    let mut kubelet = FakeKubelet::start(&plugin_dir);
    let mut s = Settings::new(&cfg);
    s.sysfs_root = fx.root().to_path_buf();
    s.plugin_dir = plugin_dir.clone();
    let _m = manager::start(s).unwrap();
    let regs = kubelet.wait_registrations(1, Duration::from_secs(30)).await;
    let endpoint = regs[0].request.endpoint.clone();
    let mut client = kubelet.plugin(&endpoint).await;

    let mut alloc1 = vec![];
    let mut alloc4 = vec![];
    for i in 0..n(2000, 50) {
        let pf = 0x20 + (i % PFS);
        let one = vec![format!("0000:{pf:02x}:10.0")];
        let four: Vec<String> = (0..4)
            .map(|k| format!("0000:{pf:02x}:10.{}", 2 * k))
            .collect();
        for (ids, v) in [(one, &mut alloc1), (four, &mut alloc4)] {
            let t = Instant::now();
            client
                .allocate(dp::AllocateRequest {
                    container_requests: vec![dp::ContainerAllocateRequest { devices_ids: ids }],
                })
                .await
                .unwrap();
            v.push(ms(t.elapsed()));
        }
    }
    println!(
        "Allocate round trip, pool of {} (ms): 1 device {}; 4 devices {}",
        PFS * VFS_PER_PF,
        stats(alloc1),
        stats(alloc4)
    );

    // Both ways kubelet comes back, interleaved: the dir emptied (kubelet's device
    // manager) and only kubelet.sock re-created (its inode number often reused).
    let (mut rereg, mut recreated, mut reused) = (vec![], vec![], 0);
    let mut registered = 1;
    for _ in 0..n(20, 3) {
        let at = kubelet.restart();
        registered += 1;
        let regs = kubelet
            .wait_registrations(registered, Duration::from_secs(30))
            .await;
        rereg.push(ms(regs.last().unwrap().at - at));
        let (at, same_inode) = kubelet.recreate_socket();
        reused += same_inode as usize;
        registered += 1;
        let regs = kubelet
            .wait_registrations(registered, Duration::from_secs(30))
            .await;
        recreated.push(ms(regs.last().unwrap().at - at));
    }
    println!(
        "kubelet restarted (dir emptied) -> registered again (ms): {}",
        stats(rereg)
    );
    println!(
        "only kubelet.sock re-created ({reused} of {} with its inode reused) -> registered again (ms): {}",
        recreated.len(),
        stats(recreated)
    );

    let mut client = kubelet.plugin(&endpoint).await;
    let mut stream = client
        .list_and_watch(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    watch_until(&mut stream, Duration::from_secs(30), |l| {
        l.len() == (PFS * VFS_PER_PF) as usize
    })
    .await;
    let mut health = vec![];
    for i in 0..n(10, 2) {
        let id = format!("0000:{:02x}:10.4", 0x20 + i);
        let t = Instant::now();
        fx.unbind(&id);
        watch_until(&mut stream, Duration::from_secs(30), |l| {
            l.iter().any(|d| d.id == id && d.health == "Unhealthy")
        })
        .await;
        health.push(ms(t.elapsed()));
        fx.bind(&id, "igbvf");
        watch_until(&mut stream, Duration::from_secs(30), |l| {
            l.iter().all(|d| d.health == "Healthy")
        })
        .await;
    }
    println!(
        "VF unbound -> ListAndWatch update, 500 ms poll (ms): {}",
        stats(health)
    );
}
