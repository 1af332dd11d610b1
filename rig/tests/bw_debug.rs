use trellis_agent::bandwidth::{Limits, Rate};
use trellis_agent::dataplane::{Dataplane, Owner};
use trellis_rig::traffic::{iperf3, veth_pair};
use trellis_rig::BpfDir;

#[test]
fn debug() {
    let dir = BpfDir::new("trellis-test");
    let mut dp = Dataplane::open(&dir.0).expect("load");
    let (a, b) = veth_pair("trbw", ["a0", "b0"], "10.89.0", None);
    let r = Rate {
        rate: 10_000_000,
        burst: 524288,
    };
    let o = Owner {
        namespace: "p".into(),
        pod: "a".into(),
        network: "p/l".into(),
        ifname: "a0".into(),
        container: "c".into(),
    };
    dp.attach_limited(
        &a.path(),
        &o,
        &Limits {
            ingress: Some(r),
            egress: Some(r),
        },
    )
    .unwrap();
    let mut out = String::new();
    for secs in [3, 3, 6] {
        for rev in [false, true] {
            let x = iperf3(&b, &a, "10.89.0.2", secs, None, rev);
            out += &format!(
                "secs {secs} rev {rev}: {:.3}\n",
                x.bps * 1514.0 / 1448.0 / 1e7
            );
        }
    }
    out += &a.sh("tc -s qdisc show; tc -s class show dev trl-in-0");
    panic!("{out}");
}
