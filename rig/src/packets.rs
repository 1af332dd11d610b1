//! Ethernet frames built by hand for BPF_PROG_TEST_RUN (tests and benchmarks): the
//! programs only read headers, so checksums are left zero.

use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// A frame from `src` to `dst` (same family) of IP protocol `proto`; TCP/UDP get
/// source port 40000 and destination port `dport`, ICMP/ICMPv6 an echo request.
/// `size` is the whole frame's length (at least the headers).
pub fn frame(src: IpAddr, dst: IpAddr, proto: u8, dport: u16, size: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    let l4: Vec<u8> = match proto {
        TCP => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&40000u16.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[12] = 5 << 4;
            h
        }
        UDP => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&40000u16.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h
        }
        ICMP => vec![8, 0, 0, 0, 0, 1, 0, 1],
        ICMPV6 => vec![128, 0, 0, 0, 0, 1, 0, 1],
        _ => vec![0; 8],
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let total = size.max(14 + 20 + l4.len()) - 14;
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            let payload = size.max(14 + 40 + l4.len()) - 14 - 40;
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            f.extend_from_slice(&ip);
        }
        _ => panic!("{src} and {dst} are of different families"),
    }
    f.extend_from_slice(&l4);
    f.resize(size.max(f.len()), 0);
    f
}

/// An ARP request (IPv4 over Ethernet) from `spa` for `tpa`.
pub fn arp(spa: std::net::Ipv4Addr, tpa: std::net::Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa.octets());
    f.resize(60, 0);
    f
}

/// An ICMPv6 neighbour discovery message of `icmp_type` from `src` to `dst`; for
/// solicitations and advertisements (135, 136), about `target`.
pub fn nd(
    icmp_type: u8,
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    target: std::net::Ipv6Addr,
) -> Vec<u8> {
    let mut f = frame(src.into(), dst.into(), ICMPV6, 0, 14 + 40 + 24);
    f[14 + 7] = 255;
    f[54] = icmp_type;
    f[55] = 0;
    f[56..62].fill(0);
    f[62..78].copy_from_slice(&target.octets());
    f
}

/// `frame` with a VLAN tag of `tpid` (0x8100, or 0x88a8 for an 802.1ad outer tag)
/// inserted after the MAC addresses.
pub fn tagged(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&tpid.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// An Ethernet frame carrying an IPv4/UDP datagram that a receiving stack accepts: IP
/// header checksum set, UDP checksum 0 (none, allowed for IPv4).
pub fn ipv4_udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 28 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 8 + payload.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = UDP;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// An IPv6 frame as `frame` builds it, with IPv6 extension headers put between the
/// fixed header and the transport header: each `(type, bytes)` is a header's whole
/// body after its next-header byte (so an 8-byte header gives 7 bytes).
pub fn with_ipv6_ext(frame6: &[u8], headers: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let (eth_ip, l4) = frame6.split_at(14 + 40);
    let mut f = eth_ip.to_vec();
    let transport = f[14 + 6];
    f[14 + 6] = headers.first().map(|h| h.0).unwrap_or(transport);
    for (i, (_, body)) in headers.iter().enumerate() {
        let next = headers.get(i + 1).map(|h| h.0).unwrap_or(transport);
        f.push(next);
        f.extend_from_slice(body);
    }
    let payload = (f.len() - 14 - 40 + l4.len()) as u16;
    f[14 + 4..14 + 6].copy_from_slice(&payload.to_be_bytes());
    f.extend_from_slice(l4);
    f
}

/// Sends `frame` out of `ifname` in `ns` through an AF_PACKET socket; with `bypass`,
/// PACKET_QDISC_BYPASS skips the interface's egress hooks (TCX egress among them),
/// as a pod with CAP_NET_RAW can.
pub fn send_raw(ns: &crate::netns::Netns, ifname: &str, frame: &[u8], bypass: bool) {
    let path = ns.path();
    let (ifname, frame) = (ifname.to_string(), frame.to_vec());
    std::thread::spawn(move || {
        crate::netns::Netns::at(path).enter_this_thread();
        let index = nix::net::if_::if_nametoindex(ifname.as_str()).expect("ifindex");
        // SAFETY: plain socket calls on an fd this closure owns and closes; the
        // sockaddr_ll is zeroed and filled as packet(7) says.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            if bypass {
                let one: libc::c_int = 1;
                let rc = libc::setsockopt(
                    fd,
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    &one as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
                assert_eq!(
                    rc,
                    0,
                    "PACKET_QDISC_BYPASS: {}",
                    std::io::Error::last_os_error()
                );
            }
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = index as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                fd,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            );
            assert_eq!(
                n as usize,
                frame.len(),
                "sendto: {}",
                std::io::Error::last_os_error()
            );
            libc::close(fd);
        }
    })
    .join()
    .unwrap();
}
