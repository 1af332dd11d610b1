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
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
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

/// What a link says about itself that the dataplane needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    /// For a veth: its peer's ifindex (in the peer's netns) and that netns as this
    /// one numbers it (None: the same netns).
    pub veth_peer: Option<(u32, Option<i32>)>,
}

fn link_facts(m: &LinkMessage) -> LinkFacts {
    let mut name = String::new();
    let (mut veth, mut peer, mut nsid) = (false, 0u32, None);
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::LinkInfo(i) => {
                veth |= i
                    .iter()
                    .any(|x| matches!(x, LinkInfo::Kind(InfoKind::Veth)))
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
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
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
