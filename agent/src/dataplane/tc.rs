//! Attaching stubs as tc filters, over a blocking rtnetlink socket.
//!
//! Why tc filters (clsact + cls_bpf, direct action) and not TCX links: on this
//! kernel every TCX link attach and detach waits out an RCU grace period with the
//! RTNL lock held (`bpf_mprog_commit`; measured 13 ms each on a 2-vCPU VM, one per
//! direction), so one interface cost ~50 ms and blocked every other netlink user on
//! the node meanwhile; a clsact qdisc and two filters cost ~0.5 ms. Filters live with
//! the device (no pins), and a filter left behind does nothing once its slot has a
//! new generation. TCX programs of other components run before tc filters.
//!
//! The socket is opened inside the netns it works in (a socket stays in the netns it
//! was made in), then used from the calling thread: one thread hop per netns.

use netlink_packet_core::{
    DefaultNla, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;
use std::os::fd::AsRawFd;

/// Our filters' priority: 1, the first a device runs (after any TCX programs).
const PRIORITY: u16 = 1;
/// Our filters' handle on each hook, so ours are found and removed by it alone.
const HANDLE: u32 = 0x7e11;
/// Our root qdisc's handle (major 0x7e11), and its HTB class's.
pub const ROOT_HANDLE: u32 = 0x7e11_0000;
const CLASS_HANDLE: u32 = 0x7e11_0001;
/// The class's leaf queue (a bfifo).
const LEAF_HANDLE: u32 = 0x7e12_0000;
/// TCA_OPTIONS, for a qdisc whose options are a plain struct (fifo).
const TCA_OPTIONS: u16 = 2;
/// How long the queue of a limited interface may be, at its rate, beyond its
/// burst: as the reference plugin's TBF `latency`. Longer only makes delay.
const QUEUE_NS: u64 = 25_000_000;
/// ...but never below two of the largest (GSO) packets, nor above this: the queue
/// is kernel memory (on a veth's host side, not the pod's), and a pod's burst may be
/// up to 4 GiB.
const MIN_QUEUE_BYTES: u64 = 2 * 65_536;
const MAX_QUEUE_BYTES: u64 = 32 << 20;
/// TC_H_ROOT.
const ROOT: u32 = 0xffff_ffff;
/// include/uapi/linux/pkt_sched.h: TCA_HTB_*, TC_LINKLAYER_ETHERNET.
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// Kernel packet-scheduler ticks are 64 ns (PSCHED_SHIFT).
const PSCHED_SHIFT: u32 = 6;

/// A device's root qdisc: its handle (0: the kernel's default one) and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootQdisc {
    pub handle: u32,
    pub kind: String,
}

/// `struct tc_ratespec` for `bytes_per_sec` (saturated: RATE64 carries the rest).
fn ratespec(bytes_per_sec: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[1] = TC_LINKLAYER_ETHERNET;
    b[8..12].copy_from_slice(&(bytes_per_sec.min(u32::MAX as u64) as u32).to_ne_bytes());
    b
}

/// `struct tc_htb_opt` for one class at `bytes_per_sec` (rate and ceiling) that may
/// send `burst_bytes` at once.
fn htb_class_opt(bytes_per_sec: u64, burst_bytes: u64) -> Vec<u8> {
    let burst_ns = (burst_bytes as u128 * 1_000_000_000 / bytes_per_sec.max(1) as u128) as u64;
    let ticks = (burst_ns >> PSCHED_SHIFT).clamp(1, u32::MAX as u64) as u32;
    let mut b = Vec::with_capacity(44);
    b.extend_from_slice(&ratespec(bytes_per_sec));
    b.extend_from_slice(&ratespec(bytes_per_sec));
    // buffer, cbuffer (ticks), quantum (bytes: one class, so any), level, prio.
    for v in [ticks, ticks, 65_536, 0, 0] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b
}

/// ETH_P_ALL, in network byte order as tcm_info wants it.
const ALL_PROTOCOLS: u16 = 0x0003u16.to_be();

/// The tc hooks of a device (clsact's two sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ingress,
    Egress,
}

impl Side {
    fn parent(self) -> TcHandle {
        TcHandle {
            major: 0xffff,
            minor: match self {
                Side::Ingress => TcHandle::MIN_INGRESS,
                Side::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

/// IFNAMSIZ (with the NUL) and IFLA_ALT_IFNAME (include/uapi/linux/if_link.h).
const IFNAMSIZ: usize = 16;
const IFLA_ALT_IFNAME: u16 = 53;

/// What a link says about itself that the dataplane needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    /// For a veth: its peer's ifindex (in the peer's netns) and that netns as this
    /// one numbers it (None: the same netns).
    pub veth_peer: Option<(u32, Option<i32>)>,
    /// An ifb device.
    pub ifb: bool,
    /// A bridge.
    pub bridge: bool,
    /// The device a macvlan or ipvlan device (or its tap) is on (IFLA_LINK, same
    /// netns): the same wire. A VLAN, tunnel or macsec device is a wire of its own.
    pub lower: Option<u32>,
}

fn link_facts(m: &LinkMessage) -> LinkFacts {
    let mut name = String::new();
    let (mut veth, mut ifb, mut bridge, mut peer, mut nsid) = (false, false, false, 0u32, None);
    let mut stacked = false;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::LinkInfo(i) => {
                let kind = |k: InfoKind| i.iter().any(|x| x == &LinkInfo::Kind(k.clone()));
                veth |= kind(InfoKind::Veth);
                ifb |= kind(InfoKind::Ifb);
                bridge |= kind(InfoKind::Bridge);
                stacked |= [
                    InfoKind::MacVlan,
                    InfoKind::MacVtap,
                    InfoKind::IpVlan,
                    InfoKind::IpVtap,
                ]
                .into_iter()
                .any(kind);
            }
            LinkAttribute::Link(i) => peer = *i,
            LinkAttribute::LinkNetNsId(n) if *n >= 0 => nsid = Some(*n),
            _ => {}
        }
    }
    LinkFacts {
        index: m.header.index,
        name,
        veth_peer: (veth && peer != 0).then_some((peer, nsid)),
        ifb,
        bridge,
        lower: (stacked && peer != 0 && peer != m.header.index && nsid.is_none()).then_some(peer),
    }
}

/// A blocking rtnetlink socket in one netns.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A socket in the calling thread's netns.
    pub fn here() -> io::Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Errors carry the kernel's own message in extended acks; we use the errno.
        Ok(Rtnl {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends `msg` and collects the answers up to the ack (or the end of a dump).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut out = vec![0u8; req.buffer_len()];
        req.serialize(&mut out);
        self.sock.send(&out, 0)?;
        let mut answers = Vec::new();
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut at = 0;
            while at < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "empty message"));
                }
                at += len.next_multiple_of(4);
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            None => Ok(answers),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    _ => {}
                }
            }
        }
    }

    /// The link named `name`, if there is one.
    pub fn link(&mut self, name: &str) -> io::Result<Option<LinkFacts>> {
        let mut m = LinkMessage::default();
        if name.len() < IFNAMSIZ {
            m.attributes.push(LinkAttribute::IfName(name.to_string()));
        } else {
            // Only an altname can be this long; IFLA_IFNAME would be refused.
            let mut v = name.as_bytes().to_vec();
            v.push(0);
            m.attributes
                .push(LinkAttribute::Other(DefaultNla::new(IFLA_ALT_IFNAME, v)));
        }
        self.get_link(m)
    }

    /// The link with ifindex `index`, if there is one.
    pub fn link_by_index(&mut self, index: u32) -> io::Result<Option<LinkFacts>> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.get_link(m)
    }

    fn get_link(&mut self, m: LinkMessage) -> io::Result<Option<LinkFacts>> {
        match self.request(RouteNetlinkMessage::GetLink(m), 0) {
            Ok(answers) => Ok(answers.iter().find_map(|a| match a {
                RouteNetlinkMessage::NewLink(l) => Some(link_facts(l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The nsid this netns gives the netns open at `ns` (None: none given).
    pub fn nsid_of(&mut self, ns: &std::fs::File) -> io::Result<Option<i32>> {
        let mut m = NsidMessage::default();
        m.attributes.push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
        let answers = self.request(RouteNetlinkMessage::GetNsId(m), 0)?;
        Ok(answers.iter().find_map(|a| match a {
            RouteNetlinkMessage::NewNsId(m) => m.attributes.iter().find_map(|x| match x {
                NsidAttribute::Id(n) if *n >= 0 => Some(*n),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// Adds a clsact qdisc to `ifindex`: whether it was added (false: the device has
    /// one already, clsact or ingress, which our filters share).
    pub fn add_clsact(&mut self, ifindex: u32) -> io::Result<bool> {
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        m.header.parent = TcHandle::CLSACT;
        m.attributes.push(TcAttribute::Kind("clsact".into()));
        match self.request(
            RouteNetlinkMessage::NewQueueDiscipline(m),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes the clsact qdisc of `ifindex` (and with it any filter left on it).
    pub fn del_clsact(&mut self, ifindex: u32) -> io::Result<()> {
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        m.header.parent = TcHandle::CLSACT;
        match self.request(RouteNetlinkMessage::DelQueueDiscipline(m), 0) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Makes the ifb device `name`, up, with a queue of 1,000 packets (an ifb's own
    /// is 32); its ifindex.
    pub fn add_ifb(&mut self, name: &str) -> io::Result<u32> {
        let mut m = LinkMessage::default();
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::TxQueueLen(1000));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Ifb)]));
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)?;
        self.link(name)?
            .map(|l| l.index)
            .ok_or_else(|| io::Error::other(format!("{name} vanished as it was made")))
    }

    /// The names of the ifb devices in this netns.
    pub fn ifbs(&mut self) -> io::Result<Vec<String>> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewLink(l) => Some(link_facts(l)),
                _ => None,
            })
            .filter(|l| l.ifb)
            .map(|l| l.name)
            .collect())
    }

    /// Deletes the ifb device `name`, if there is one; whether there was.
    pub fn del_ifb(&mut self, name: &str) -> io::Result<bool> {
        let index = match self.link(name)? {
            Some(l) if l.ifb => l.index,
            _ => return Ok(false),
        };
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.request(RouteNetlinkMessage::DelLink(m), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The root qdisc of `ifindex` (None: the device has none, or is gone).
    pub fn root_qdisc(&mut self, ifindex: u32) -> io::Result<Option<RootQdisc>> {
        let m = TcMessage::with_index(ifindex as i32);
        let answers = self.request(RouteNetlinkMessage::GetQueueDiscipline(m), NLM_F_DUMP)?;
        Ok(answers.iter().find_map(|a| match a {
            RouteNetlinkMessage::NewQueueDiscipline(m)
                if m.header.index == ifindex as i32 && u32::from(m.header.parent) == ROOT =>
            {
                Some(RootQdisc {
                    handle: u32::from(m.header.handle),
                    kind: m
                        .attributes
                        .iter()
                        .find_map(|x| match x {
                            TcAttribute::Kind(k) => Some(k.clone()),
                            _ => None,
                        })
                        .unwrap_or_default(),
                })
            }
            _ => None,
        }))
    }

    /// Makes ours the root qdisc of `ifindex`: fq (`rate` None: the programs pace,
    /// fq holds each packet until its departure time), or an HTB with one class,
    /// the default, at `rate` (bytes/s, burst bytes). Fails if the device's root
    /// qdisc is not the kernel's default (or ours): someone else's is never replaced.
    pub fn add_root(&mut self, ifindex: u32, rate: Option<(u64, u64)>) -> io::Result<()> {
        match self.root_qdisc(ifindex)? {
            Some(q) if q.handle != 0 && q.handle != ROOT_HANDLE => {
                return Err(io::Error::other(format!(
                    "the interface has a root qdisc of its own ({} {:x}:): not replacing it",
                    q.kind,
                    q.handle >> 16
                )))
            }
            // Ours, left by an agent whose pins are gone: made again (an HTB cannot
            // be changed in place, nor turned into fq).
            Some(q) if q.handle == ROOT_HANDLE => {
                self.del_root(ifindex)?;
            }
            _ => {}
        }
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.handle = TcHandle::from(ROOT_HANDLE);
        m.header.parent = TcHandle::from(ROOT);
        match rate {
            None => m.attributes.push(TcAttribute::Kind("fq".into())),
            Some(_) => {
                // struct tc_htb_glob: version 3, rate2quantum 10, default class 1.
                let mut glob = Vec::with_capacity(20);
                for v in [3u32, 10, CLASS_HANDLE & 0xffff, 0, 0] {
                    glob.extend_from_slice(&v.to_ne_bytes());
                }
                m.attributes.push(TcAttribute::Kind("htb".into()));
                m.attributes.push(TcAttribute::Options(vec![TcOption::Other(
                    DefaultNla::new(TCA_HTB_INIT, glob),
                )]));
            }
        }
        // EXCL: a root qdisc someone added since the look above is refused by the
        // kernel (the default one, handle 0, is replaced).
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                io::Error::other("the interface has a root qdisc of its own: not replacing it")
            } else {
                e
            }
        })?;
        let Some((bytes_per_sec, burst)) = rate else {
            return Ok(());
        };
        let mut options = vec![TcOption::Other(DefaultNla::new(
            TCA_HTB_PARMS,
            htb_class_opt(bytes_per_sec, burst),
        ))];
        if bytes_per_sec > u32::MAX as u64 {
            for kind in [TCA_HTB_RATE64, TCA_HTB_CEIL64] {
                options.push(TcOption::Other(DefaultNla::new(
                    kind,
                    bytes_per_sec.to_ne_bytes().to_vec(),
                )));
            }
        }
        let mut c = TcMessage::with_index(ifindex as i32);
        c.header.handle = TcHandle::from(CLASS_HANDLE);
        c.header.parent = TcHandle::from(ROOT_HANDLE);
        c.attributes.push(TcAttribute::Kind("htb".into()));
        c.attributes.push(TcAttribute::Options(options));
        let made = self
            .request(
                RouteNetlinkMessage::NewTrafficClass(c),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .and_then(|_| {
                // A queue sized by time, not HTB's default of txqueuelen packets
                // (1,000 full frames are 1.2 s at 10 Mbit/s).
                let limit = (burst
                    + (bytes_per_sec as u128 * QUEUE_NS as u128 / 1_000_000_000) as u64)
                    .clamp(MIN_QUEUE_BYTES, MAX_QUEUE_BYTES) as u32;
                let mut q = TcMessage::with_index(ifindex as i32);
                q.header.handle = TcHandle::from(LEAF_HANDLE);
                q.header.parent = TcHandle::from(CLASS_HANDLE);
                q.attributes.push(TcAttribute::Kind("bfifo".into()));
                q.attributes.push(TcAttribute::Other(DefaultNla::new(
                    TCA_OPTIONS,
                    limit.to_ne_bytes().to_vec(),
                )));
                self.request(
                    RouteNetlinkMessage::NewQueueDiscipline(q),
                    NLM_F_CREATE | NLM_F_REPLACE,
                )
            });
        if made.is_err() {
            let _ = self.del_root(ifindex);
        }
        made.map(|_| ())
    }

    /// Removes our root qdisc from `ifindex` (the kernel puts its default back);
    /// whether it was there. Anyone else's is left alone.
    pub fn del_root(&mut self, ifindex: u32) -> io::Result<bool> {
        if self.root_qdisc(ifindex)?.map(|q| q.handle) != Some(ROOT_HANDLE) {
            return Ok(false);
        }
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.handle = TcHandle::from(ROOT_HANDLE);
        m.header.parent = TcHandle::from(ROOT);
        match self.request(RouteNetlinkMessage::DelQueueDiscipline(m), 0) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn filter_header(ifindex: u32, side: Side) -> TcHeader {
        TcHeader {
            index: ifindex as i32,
            handle: TcHandle::from(HANDLE),
            parent: side.parent(),
            info: ((PRIORITY as u32) << 16) | ALL_PROTOCOLS as u32,
            ..Default::default()
        }
    }

    /// Attaches the program `prog` as our filter on `side` of `ifindex`, of classid
    /// `class` and named `name`, in place of ours already there (left by an agent
    /// whose pins are gone).
    pub fn add_filter(
        &mut self,
        ifindex: u32,
        side: Side,
        prog: std::os::fd::BorrowedFd<'_>,
        class: u32,
        name: &str,
    ) -> io::Result<()> {
        let m = TcMessage::from_parts(
            Self::filter_header(ifindex, side),
            vec![
                TcAttribute::Kind("bpf".into()),
                TcAttribute::Options(vec![
                    TcOption::Bpf(TcFilterBpfOption::ProgFd(prog.as_raw_fd() as u32)),
                    TcOption::Bpf(TcFilterBpfOption::ClassId(TcHandle::from(class))),
                    TcOption::Bpf(TcFilterBpfOption::ProgName(name.to_string())),
                    TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
                ]),
            ],
        );
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(|_| ())
    }

    /// Removes our filter from `side` of `ifindex`; whether there was one.
    pub fn del_filter(&mut self, ifindex: u32, side: Side) -> io::Result<bool> {
        let m = TcMessage::from_parts(
            Self::filter_header(ifindex, side),
            vec![TcAttribute::Kind("bpf".into())],
        );
        match self.request(RouteNetlinkMessage::DelTrafficFilter(m), 0) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The filters (anyone's) on `side` of `ifindex`: the classid of each of ours
    /// (bpf, our handle), None for any other.
    pub fn filters(&mut self, ifindex: u32, side: Side) -> io::Result<Vec<Option<u32>>> {
        let mut m = TcMessage::with_index(ifindex as i32);
        m.header.parent = side.parent();
        let answers = match self.request(RouteNetlinkMessage::GetTrafficFilter(m), NLM_F_DUMP) {
            Ok(a) => a,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
        // A dump names each priority's classifier (handle 0), then its filters.
        Ok(answers
            .iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewTrafficFilter(m) if u32::from(m.header.handle) != 0 => {
                    Some(m)
                }
                _ => None,
            })
            .map(|m| {
                if u32::from(m.header.handle) != HANDLE {
                    return None;
                }
                m.attributes.iter().find_map(|x| match x {
                    TcAttribute::Options(o) => o.iter().find_map(|o| match o {
                        TcOption::Bpf(TcFilterBpfOption::ClassId(c)) => Some(u32::from(*c)),
                        _ => None,
                    }),
                    _ => None,
                })
            })
            .collect())
    }
}
