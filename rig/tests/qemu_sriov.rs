//! Real VFs into pods: in a QEMU guest with the emulated 82576 (igb), the agent (through
//! the real shim) puts VF 0 and VF 1 into two pod netns with the requested MAC and VLAN
//! (the PF's `vf` lines show them), static IPs, and traffic between the pods across the
//! NIC; DEL puts each VF back in the host with its original name and MAC and the PF's
//! settings as they were. A NAD naming the PF is refused (the PF stays in the host),
//! and a VF ADD the driver refuses (igb has no link_state) leaves the VF free. A VF
//! network with a bandwidth cap gets max_tx_rate and an ifb queue (both gone after
//! DEL); a veth network's egress limit is paced with fq (this guest kernel has it).

use std::time::Duration;
use trellis_rig::qemu::{GuestKernel, Initramfs};

const AGENT: &str = r#"socket = "/run/trellis/cni.sock"
state_dir = "/run/trellis/state"
cni_bin_dirs = ["/usr/lib/cni"]
default_network = "/etc/trellis/default.conflist"
[dataplane]
enabled = true
[networks]
source = "files"
dir = "/etc/trellis/networks"
[devices]
config = "/etc/trellis/devices.json"
"#;

/// Every 82576 VF, whatever its driver (igbvf, or vfio-pci for DPDK).
const DEVICES: &str = r#"{"resourceList":[{"resourceName":"igbvf","selectors":{"vendors":["8086"],"devices":["10ca"]}}]}"#;

const SCRIPT: &str = r#"
IP=/sbin/ip
mkdir -p /var /etc/trellis/networks && ln -s /run /var/run
PF=$(ls /sys/bus/pci/drivers/igb | grep '^0000:')
PFDIR=/sys/bus/pci/devices/$PF
PFNET=$(ls $PFDIR/net)
$IP link set "$PFNET" up
echo 2 > $PFDIR/sriov_numvfs
sleep 3
VF0=$(basename "$(readlink $PFDIR/virtfn0)")
VF1=$(basename "$(readlink $PFDIR/virtfn1)")
for i in 0 1; do
  VF=$(basename "$(readlink $PFDIR/virtfn$i)")
  cat > /etc/trellis/networks/vf$i.json <<EOF
{"apiVersion":"k8s.cni.cncf.io/v1","kind":"NetworkAttachmentDefinition",
 "metadata":{"name":"vf$i","namespace":"pods"},
 "spec":{"config":"{\"cniVersion\":\"1.0.0\",\"type\":\"sriov\",\"name\":\"vf$i\",\"deviceID\":\"$VF\",\"vlan\":100,\"spoofchk\":\"off\",\"trust\":\"on\",\"capabilities\":{\"mac\":true,\"ips\":true},\"ipam\":{\"type\":\"static\"}}"}}
EOF
done
echo "=== before"
echo "PF $PFNET VF0 $VF0 $(ls $PFDIR/virtfn0/net) $(cat $PFDIR/virtfn0/net/*/address) VF1 $VF1 $(ls $PFDIR/virtfn1/net) $(cat $PFDIR/virtfn1/net/*/address)"
$IP link show "$PFNET"
trellis agent --config /etc/trellis/agent.toml > /tmp/agent.log 2>&1 &
i=0; while [ ! -S /run/trellis/cni.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
call() { # COMMAND CONTAINER POD NETWORKS-JSON
  printf '{"cniVersion":"'${CNIV:-1.0.0}'","name":"trellis","type":"trellis-cni","socket":"/run/trellis/cni.sock","capabilities":{"io.kubernetes.cri.pod-annotations":true},"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"k8s.v1.cni.cncf.io/networks":"%s"}}}' "$4" > /tmp/stdin.json
  CNI_COMMAND=$1 CNI_CONTAINERID=$2 CNI_NETNS=/run/netns/$3 CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni \
  CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=pods;K8S_POD_NAME=$3;K8S_POD_INFRA_CONTAINER_ID=$2" \
    trellis-cni < /tmp/stdin.json
  echo " rc=$?"
}
$IP netns add pod0
$IP netns add pod1
echo "=== add"
call ADD c0 pod0 '[{\"name\":\"vf0\",\"interface\":\"fast0\",\"mac\":\"02:aa:bb:cc:00:01\",\"ips\":[\"192.168.50.10/24\"]}]'
call ADD c1 pod1 '[{\"name\":\"vf1\",\"interface\":\"fast0\",\"mac\":\"02:aa:bb:cc:00:02\",\"ips\":[\"192.168.50.11/24\"]}]'
echo "=== pf-during"
$IP link show "$PFNET"
echo "=== pod0"
$IP netns exec pod0 $IP -o link show fast0
$IP netns exec pod0 $IP -o -4 addr show fast0
echo "=== filters"
for p in pod0 pod1; do for d in ingress egress; do $IP netns exec $p /sbin/tc filter show dev fast0 $d | grep -o 'trellis-[0-9]*'; done; done
echo "=== ping"
$IP netns exec pod0 ping -c 3 -W 3 192.168.50.11
echo "ping rc=$?"
echo "=== del"
call DEL c0 pod0 '[{\"name\":\"vf0\",\"interface\":\"fast0\",\"mac\":\"02:aa:bb:cc:00:01\",\"ips\":[\"192.168.50.10/24\"]}]'
$IP netns del pod1
# The kernel hands the VF back from a work queue: DEL comes once it is back (the agent
# does not wait for it; see docs/sriov.md).
for i in $(seq 100); do ls $PFDIR/virtfn1/net/* >/dev/null 2>&1 && break; sleep 0.1; done
call DEL c1 pod1 '[{\"name\":\"vf1\",\"interface\":\"fast0\",\"mac\":\"02:aa:bb:cc:00:02\",\"ips\":[\"192.168.50.11/24\"]}]'
sleep 1
echo "=== after"
echo "PF $PFNET VF0 $VF0 $(ls $PFDIR/virtfn0/net) $(cat $PFDIR/virtfn0/net/*/address) VF1 $VF1 $(ls $PFDIR/virtfn1/net) $(cat $PFDIR/virtfn1/net/*/address)"
$IP link show "$PFNET"
echo "=== hotplug"
$IP netns add pod3
call ADD c10 pod3 '[{\"name\":\"vf0\",\"interface\":\"fast0\",\"ips\":[\"192.168.50.10/24\"]}]'
call ADD c11 pod0 ''
trellis attach --pod pods/pod0 '{"name":"vf1","interface":"fast1","mac":"02:aa:bb:cc:00:03","ips":["192.168.50.12/24"]}' > /tmp/attach.json 2>&1
echo "attach rc=$?"
cat /tmp/attach.json | tr -d ' \n' | head -c 300; echo
$IP netns exec pod0 $IP -o link show fast1
$IP netns exec pod0 ping -c 3 -W 3 192.168.50.10
echo "hotplug ping rc=$?"
trellis stats --json --pod pod0 | tr -d ' \n' | grep -o '"ifname":"fast1"'
trellis detach --pod pods/pod0 @fast1
echo "detach rc=$?"
echo "vf1 back: $(ls $PFDIR/virtfn1/net) $(cat $PFDIR/virtfn1/net/*/address)"
call DEL c10 pod3 '[{\"name\":\"vf0\",\"interface\":\"fast0\",\"ips\":[\"192.168.50.10/24\"]}]'
call DEL c11 pod0 ''
echo "=== pf-refused"
cat > /etc/trellis/networks/pf.json <<EOF
{"apiVersion":"k8s.cni.cncf.io/v1","kind":"NetworkAttachmentDefinition",
 "metadata":{"name":"pf","namespace":"pods"},
 "spec":{"config":"{\"cniVersion\":\"1.0.0\",\"type\":\"sriov\",\"name\":\"pf\",\"deviceID\":\"$PF\"}"}}
EOF
call ADD c6 pod0 'pf'
echo "pf in host: $(ls $PFDIR/net)"
$IP netns exec pod0 $IP -o link
echo "=== link-state"
cat > /etc/trellis/networks/ls.json <<EOF
{"apiVersion":"k8s.cni.cncf.io/v1","kind":"NetworkAttachmentDefinition",
 "metadata":{"name":"ls","namespace":"pods"},
 "spec":{"config":"{\"cniVersion\":\"1.0.0\",\"type\":\"sriov\",\"name\":\"ls\",\"deviceID\":\"$VF0\",\"vlan\":300,\"link_state\":\"enable\"}"}}
EOF
call ADD c5 pod0 'ls'
echo "vf state: [$(ls /run/trellis/state/vfs)]"
$IP link show "$PFNET" | grep "vf 0 "
echo "=== pf-net"
cat > /etc/trellis/networks/plain.json <<EOF
{"apiVersion":"k8s.cni.cncf.io/v1","kind":"NetworkAttachmentDefinition",
 "metadata":{"name":"plain","namespace":"pods"},
 "spec":{"config":"{\"cniVersion\":\"1.0.0\",\"type\":\"sriov\",\"name\":\"plain\",\"deviceID\":\"$VF0\",\"capabilities\":{\"ips\":true},\"ipam\":{\"type\":\"static\"}}"}}
EOF
$IP addr add 192.168.60.1/24 dev "$PFNET"
call ADD c4 pod0 '[{\"name\":\"plain\",\"ips\":[\"192.168.60.10/24\"]}]'
$IP netns exec pod0 ping -c 3 -W 3 192.168.60.1
echo "pf ping rc=$?"
call DEL c4 pod0 '[{\"name\":\"plain\",\"ips\":[\"192.168.60.10/24\"]}]'
echo "=== bandwidth"
cat > /etc/trellis/networks/vfbw.json <<EOF
{"apiVersion":"k8s.cni.cncf.io/v1","kind":"NetworkAttachmentDefinition",
 "metadata":{"name":"vfbw","namespace":"pods","annotations":{"trellis.dev/bandwidth":"{\"ingressRate\":30000000,\"ingressBurst\":300000,\"egressRate\":50000000,\"egressBurst\":500000}"}},
 "spec":{"config":"{\"cniVersion\":\"1.0.0\",\"type\":\"sriov\",\"name\":\"vfbw\",\"deviceID\":\"$VF0\"}"}}
EOF
call ADD c8 pod0 'vfbw'
$IP link show "$PFNET" | grep "vf 0 "
echo "ifb: $($IP netns exec pod0 $IP -o link | grep -o 'trl-in-[0-9]*')"
trellis stats --json --pod pod0 | tr -d ' \n' | grep -o '"[a-z]*_limit":{[^}]*}'
echo
call DEL c8 pod0 'vfbw'
echo "=== bandwidth-after"
$IP link show "$PFNET" | grep "vf 0 "
echo "ifb: $($IP netns exec pod0 $IP -o link | grep -c 'trl-in-')"
echo "=== fq"
cat > /etc/trellis/networks/ptpbw.json <<EOF
{"apiVersion":"k8s.cni.cncf.io/v1","kind":"NetworkAttachmentDefinition",
 "metadata":{"name":"ptpbw","namespace":"pods","annotations":{"trellis.dev/bandwidth":"{\"egressRate\":10000000,\"egressBurst\":100000}"}},
 "spec":{"config":"{\"cniVersion\":\"1.0.0\",\"type\":\"ptp\",\"name\":\"ptpbw\",\"ipam\":{\"type\":\"static\",\"addresses\":[{\"address\":\"192.168.70.10/24\",\"gateway\":\"192.168.70.1\"}]}}"}}
EOF
$IP netns add pod2
$IP netns exec pod2 $IP link set lo up
call ADD c9 pod2 'ptpbw'
$IP netns exec pod2 /sbin/tc qdisc show dev net1
trellis stats --json --pod pod2 | tr -d ' \n' | grep -o '"egress_limit":{[^}]*}'
echo
iperf3 -s -1 -D -B 192.168.70.1 >/dev/null 2>&1
sleep 1
timeout 60 $IP netns exec pod2 iperf3 -c 192.168.70.1 -t 4 -O 1 -J > /tmp/iperf.json 2>&1
echo "iperf rc=$?"
echo "received: $(tr -d ' \t\n' < /tmp/iperf.json | grep -o '"sum_received":{[^}]*}' | grep -o '"bits_per_second":[0-9.e+]*' | cut -d: -f2)"
call DEL c9 pod2 'ptpbw'
echo "=== vfio"
echo vfio-pci > /sys/bus/pci/devices/$VF1/driver_override
echo "$VF1" > /sys/bus/pci/devices/$VF1/driver/unbind
echo "$VF1" > /sys/bus/pci/drivers_probe
for n in dpdk dpdkmtu; do
  extra=""; [ $n = dpdkmtu ] && extra=',\"mtu\":1400'
  cat > /etc/trellis/networks/$n.json <<EOF
{"apiVersion":"k8s.cni.cncf.io/v1","kind":"NetworkAttachmentDefinition",
 "metadata":{"name":"$n","namespace":"pods"},
 "spec":{"config":"{\"cniVersion\":\"1.1.0\",\"type\":\"sriov\",\"name\":\"$n\",\"deviceID\":\"$VF1\",\"vlan\":200$extra}"}}
EOF
done
readlink /sys/bus/pci/devices/$VF1/driver
CNIV=1.1.0 call ADD c3 pod0 'dpdkmtu'
CNIV=1.1.0 call ADD c2 pod0 'dpdk'
$IP link show "$PFNET" | grep "vf 1 "
CNIV=1.1.0 call DEL c2 pod0 'dpdk'
$IP link show "$PFNET" | grep "vf 1 "
echo "=== pod0-after"
$IP netns exec pod0 $IP -o link
echo "=== state"
ls /run/trellis/state/vfs
echo "=== agent"
cat /tmp/agent.log
echo "=== end"
"#;

/// The `vf N ...` line of `ip link show PF`.
fn vf_line(section: &str, n: u32) -> String {
    section
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("vf {n} ")))
        .unwrap_or_else(|| panic!("no vf {n} line in {section}"))
        .to_string()
}

#[test]
fn real_vfs_are_placed_with_mac_vlan_and_ip_and_restored() {
    trellis_rig::require_root!();
    let Some(kernel) = GuestKernel::find() else {
        panic!(
            "no guest kernel: run scripts/setup.sh (it unpacks one to /var/cache/trellis/guest)"
        );
    };
    let img = Initramfs::new(&kernel);
    img.program(trellis_rig::bins::trellis(), "trellis");
    img.program(trellis_rig::bins::shim(), "trellis-cni");
    img.program_at("/usr/bin/ip", "sbin/ip");
    img.program_at("/usr/sbin/tc", "sbin/tc");
    img.program("/usr/bin/iperf3", "iperf3");
    for p in ["static", "loopback", "ptp"] {
        img.program_at(format!("/usr/lib/cni/{p}"), &format!("usr/lib/cni/{p}"));
    }
    img.text("etc/trellis/agent.toml", AGENT, 0o644);
    img.text("etc/trellis/devices.json", DEVICES, 0o644);
    img.text(
        "etc/trellis/default.conflist",
        r#"{"cniVersion":"1.0.0","name":"cluster","plugins":[{"type":"loopback"}]}"#,
        0o644,
    );
    img.text("test.sh", SCRIPT, 0o755);
    let run = img.boot(&kernel, Duration::from_secs(600));
    let c = &run.console;
    let section = |s: &str| {
        run.section(s)
            .unwrap_or_else(|| panic!("no {s} section:\n{c}"))
    };
    let agent_log = section("agent");

    // A VF network with a bandwidth cap: egress as the VF's max_tx_rate (on the
    // PF), ingress queued through an ifb in the pod; DEL puts the rate back and
    // takes the ifb.
    let bw = section("bandwidth");
    assert!(bw.contains(" rc=0"), "{bw}\n{agent_log}");
    assert!(vf_line(&bw, 0).contains("max_tx_rate 50Mbps"), "{bw}");
    assert!(bw.contains("ifb: trl-in-"), "{bw}");
    assert!(
        bw.contains(r#""ingress_limit":{"rate":30000000,"burst":300000,"by":"ifb-htb"}"#),
        "{bw}"
    );
    let bw_after = section("bandwidth-after");
    assert!(!vf_line(&bw_after, 0).contains("max_tx_rate"), "{bw_after}");
    assert!(bw_after.contains("ifb: 0"), "{bw_after}");
    // This guest kernel has fq: an egress limit is paced by the programs (EDT) and
    // held by an fq root qdisc. TCP through it stays near the limit (goodput; the
    // limit counts a GSO packet's headers once).
    let fq = section("fq");
    assert!(fq.contains(" rc=0"), "{fq}\n{agent_log}");
    assert!(fq.contains("qdisc fq 7e11: root"), "{fq}");
    assert!(
        fq.contains(r#""egress_limit":{"rate":10000000,"burst":100000,"by":"fq"}"#),
        "{fq}"
    );
    let got: f64 = fq
        .lines()
        .find_map(|l| l.strip_prefix("received: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no iperf3 figure: {fq}"));
    assert!(
        (8_000_000.0..=10_500_000.0).contains(&got),
        "TCP through a 10 Mbit/s fq-paced limit: {got} bit/s\n{fq}"
    );

    let before = section("before");
    let words: Vec<&str> = before.split_whitespace().collect();
    let (vf0_name, vf0_mac) = (words[4], words[5]);
    let (vf1_name, vf1_mac) = (words[8], words[9]);
    let pf_before = vf_line(&before, 0);

    // Hot-plug of a real VF into a running pod (trellis attach), traffic across the
    // NIC over it, counted; detach puts it back in the host as it was.
    let hp = section("hotplug");
    assert!(hp.contains("attach rc=0"), "{hp}\n{agent_log}");
    assert!(hp.contains(": fast1: "), "{hp}");
    assert!(hp.contains("hotplug ping rc=0"), "{hp}\n{agent_log}");
    assert!(hp.contains(r#""ifname":"fast1""#), "{hp}");
    assert!(hp.contains("detach rc=0"), "{hp}");
    assert!(
        hp.contains(&format!("vf1 back: {vf1_name} {vf1_mac}")),
        "{hp}"
    );

    let add = section("add");
    assert_eq!(add.matches(" rc=0").count(), 2, "{add}\n{agent_log}");

    // The PF holds the requested MAC and VLAN for each VF.
    let during = section("pf-during");
    let l0 = vf_line(&during, 0);
    assert!(
        l0.contains("02:aa:bb:cc:00:01") && l0.contains("vlan 100"),
        "{l0}"
    );
    assert!(
        l0.contains("spoof checking off") && l0.contains("trust on"),
        "{l0}"
    );
    assert!(vf_line(&during, 1).contains("02:aa:bb:cc:00:02"));

    // In the pod: renamed, the MAC, up, the IP.
    let pod0 = section("pod0");
    assert!(
        pod0.contains("fast0") && pod0.contains("02:aa:bb:cc:00:01"),
        "{pod0}"
    );
    assert!(pod0.contains("192.168.50.10/24"), "{pod0}");

    // The dataplane is on each pod's VF netdev, a tc filter per direction (the
    // guest's cluster network is loopback, which makes no eth0 to attach to).
    let filters = section("filters");
    assert_eq!(
        filters.split_whitespace().count(),
        4,
        "two VFs x two directions: {filters}"
    );

    // Traffic between the two pods' VFs, across the NIC, on VLAN 100.
    let ping = section("ping");
    assert!(ping.contains("ping rc=0"), "{ping}\n{agent_log}");

    // Back in the host as they were, the PF's settings as before; the second pod's
    // netns was deleted before its DEL (the VF came back to the host on its own).
    let del = section("del");
    assert_eq!(del.matches(" rc=0").count(), 2, "{del}\n{agent_log}");
    let after = section("after");
    let w: Vec<&str> = after.split_whitespace().collect();
    assert_eq!(
        (w[4], w[5]),
        (vf0_name, vf0_mac),
        "VF0 not restored: {after}"
    );
    assert_eq!(
        (w[8], w[9]),
        (vf1_name, vf1_mac),
        "VF1 not restored: {after}"
    );
    let pf_after = vf_line(&after, 0);
    assert_eq!(pf_after, pf_before, "PF-side settings of VF 0 not restored");
    assert!(!section("pod0-after").contains("fast0"));
    // The PF is no pod's device: refused, naming the field, and still in the host.
    let pf = section("pf-refused");
    assert!(pf.contains(" rc=1"), "{pf}");
    assert!(
        pf.contains("deviceID") && pf.contains("is not a device of any pool"),
        "{pf}"
    );
    assert!(pf.contains(&format!("pf in host: {}", words[1])), "{pf}");
    // igb refuses link_state: the ADD fails, what it set (the VLAN) is put back and
    // nothing holds the VF; the next ADD on it (pf-net) works.
    let ls = section("link-state");
    assert!(
        ls.contains(" rc=1") && ls.contains("link_state"),
        "{ls}\n{agent_log}"
    );
    assert!(ls.contains("vf state: []"), "{ls}");
    assert!(!vf_line(&ls, 0).contains("vlan 300"), "{ls}");
    // Traffic to the PF's own network from a VF without a VLAN.
    let pf_net = section("pf-net");
    assert!(pf_net.contains("pf ping rc=0"), "{pf_net}\n{agent_log}");
    assert_eq!(pf_net.matches(" rc=0").count(), 3, "{pf_net}");

    // A vfio-pci VF (DPDK): no netdev to move, PF-side settings only, the device in
    // the result as pciID; asking it for an MTU is an error.
    let vfio = section("vfio");
    let vf1_pci = words[7];
    assert!(vfio.contains("vfio-pci"), "{vfio}");
    assert!(
        vfio.contains("bound to vfio-pci (DPDK) and has no netdev"),
        "{vfio}"
    );
    assert!(
        vfio.contains(&format!("\"pciID\":\"{vf1_pci}\"")),
        "{vfio}\n{agent_log}"
    );
    let vf1_lines: Vec<&str> = vfio
        .lines()
        .filter(|l| l.trim_start().starts_with("vf 1 "))
        .collect();
    assert_eq!(vf1_lines.len(), 2, "{vfio}");
    assert!(vf1_lines[0].contains("vlan 200"), "{}", vf1_lines[0]);
    assert!(!vf1_lines[1].contains("vlan 200"), "{}", vf1_lines[1]);
    let state = section("state");
    assert!(state.trim().is_empty(), "VF records left: {state}");
}
