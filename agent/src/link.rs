//! Synchronous netlink for one network namespace: links (rename, MTU, MAC, up/down,
//! move to another namespace), SR-IOV VF settings on a PF (IFLA_VF_*), addresses and
//! routes. The socket is opened in the namespace it works on and stays there, so it
//! can be used from any thread afterwards.

use futures_util::TryStreamExt;
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkFlags, LinkMessage, LinkVfInfo, VfInfo, VfInfoLinkState,
    VfInfoMac, VfInfoRate, VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan, VfLinkState, VfVlan,
    VfVlanInfo, VlanProtocol,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("network namespace {netns}: {source}")]
    Netns {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: {0}")]
    Socket(String),
    #[error("{what}: {message}")]
    Op { what: String, message: String },
}

fn op(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |e| LinkError::Op {
        what,
        message: match e {
            rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
            other => other.to_string(),
        },
    }
}

/// What a link looks like now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub up: bool,
}

/// A VF's settings as its PF holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfSettings {
    pub mac: Option<[u8; 6]>,
    /// (VLAN ID, QoS, 802.1ad instead of 802.1Q)
    pub vlan: Option<(u16, u8, bool)>,
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
    /// 0 auto, 1 enable, 2 disable (IFLA_VF_LINK_STATE_*).
    pub link_state: Option<u32>,
    /// (min, max) Mbps; 0 is no limit.
    pub rate: Option<(u32, u32)>,
}

impl VfSettings {
    /// Each setting on its own, in the order `Netlink::set_vf` applies them.
    pub fn parts(&self) -> Vec<VfSettings> {
        let one = VfSettings::default;
        let mut out = Vec::new();
        if self.mac.is_some() {
            out.push(VfSettings {
                mac: self.mac,
                ..one()
            });
        }
        if self.vlan.is_some() {
            out.push(VfSettings {
                vlan: self.vlan,
                ..one()
            });
        }
        if self.spoofchk.is_some() {
            out.push(VfSettings {
                spoofchk: self.spoofchk,
                ..one()
            });
        }
        if self.trust.is_some() {
            out.push(VfSettings {
                trust: self.trust,
                ..one()
            });
        }
        if self.link_state.is_some() {
            out.push(VfSettings {
                link_state: self.link_state,
                ..one()
            });
        }
        if self.rate.is_some() {
            out.push(VfSettings {
                rate: self.rate,
                ..one()
            });
        }
        out
    }

    /// Whether no setting is set.
    pub fn is_empty(&self) -> bool {
        self.parts().is_empty()
    }

    /// `other`'s settings laid over these.
    pub fn merge(&mut self, other: &VfSettings) {
        self.mac = other.mac.or(self.mac);
        self.vlan = other.vlan.or(self.vlan);
        self.spoofchk = other.spoofchk.or(self.spoofchk);
        self.trust = other.trust.or(self.trust);
        self.link_state = other.link_state.or(self.link_state);
        self.rate = other.rate.or(self.rate);
    }
}

/// Changes to make to a link in one request; `None` leaves a property alone.
#[derive(Debug, Default)]
pub struct LinkChange<'a> {
    pub name: Option<&'a str>,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub up: Option<bool>,
    /// Move it into the namespace at this path.
    pub netns: Option<&'a Path>,
}

pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Netlink {
    /// A socket in the calling thread's namespace.
    pub fn here() -> Result<Netlink, LinkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| LinkError::Socket(e.to_string()))?;
        let handle = rt.block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| LinkError::Socket(e.to_string()))?;
            tokio::spawn(conn);
            Ok::<_, LinkError>(handle)
        })?;
        Ok(Netlink { rt, handle })
    }

    /// A socket inside the namespace at `netns`.
    pub fn in_netns(netns: &Path) -> Result<Netlink, LinkError> {
        crate::netns::run_in(netns, Netlink::here).map_err(|source| LinkError::Netns {
            netns: netns.display().to_string(),
            source,
        })?
    }

    fn state_of(m: &LinkMessage) -> LinkState {
        let mut s = LinkState {
            index: m.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => s.name = n.clone(),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    s.mac = Some(a[..6].try_into().expect("6 bytes"))
                }
                LinkAttribute::Mtu(m) => s.mtu = Some(*m),
                _ => {}
            }
        }
        s
    }

    pub fn link(&self, name: &str) -> Result<Option<LinkState>, LinkError> {
        self.rt.block_on(async {
            let mut r = self
                .handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute();
            match r.try_next().await {
                Ok(Some(m)) => Ok(Some(Self::state_of(&m))),
                Ok(None) => Ok(None),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
                Err(e) => Err(op(format!("looking up {name}"))(e)),
            }
        })
    }

    pub fn link_by_index(&self, index: u32) -> Result<Option<LinkState>, LinkError> {
        self.rt.block_on(async {
            let mut r = self.handle.link().get().match_index(index).execute();
            match r.try_next().await {
                Ok(m) => Ok(m.as_ref().map(Self::state_of)),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
                Err(e) => Err(op(format!("looking up link {index}"))(e)),
            }
        })
    }

    /// Applies `change` to link `index` in one RTM_SETLINK.
    pub fn set(&self, index: u32, what: &str, change: &LinkChange) -> Result<(), LinkError> {
        let netns_file = match change.netns {
            Some(p) => Some(crate::netns::open(p).map_err(|source| LinkError::Netns {
                netns: p.display().to_string(),
                source,
            })?),
            None => None,
        };
        let mut b = LinkUnspec::new_with_index(index);
        if let Some(n) = change.name {
            b = b.name(n);
        }
        if let Some(m) = change.mtu {
            b = b.mtu(m);
        }
        if let Some(m) = change.mac {
            b = b.address(m.to_vec());
        }
        match change.up {
            Some(true) => b = b.up(),
            Some(false) => b = b.down(),
            None => {}
        }
        if let Some(f) = &netns_file {
            b = b.setns_by_fd(f.as_raw_fd());
        }
        let msg = b.build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(op(what.to_string()))
    }

    /// The VF settings the PF (link `pf`) holds for VF `vf`.
    pub fn vf_settings(&self, pf: u32, vf: u32) -> Result<VfSettings, LinkError> {
        let msg = self.rt.block_on(async {
            let mut r = self
                .handle
                .link()
                .get()
                .match_index(pf)
                .set_filter_mask(AddressFamily::Unspec, vec![LinkExtentMask::Vf])
                .execute();
            r.try_next().await
        });
        let msg = msg
            .map_err(op(format!("reading VF {vf} settings")))?
            .ok_or_else(|| LinkError::Op {
                what: format!("reading VF {vf} settings"),
                message: "PF is gone".into(),
            })?;
        let infos: Vec<&LinkVfInfo> = msg
            .attributes
            .iter()
            .filter_map(|a| match a {
                LinkAttribute::VfInfoList(l) => Some(l.iter()),
                _ => None,
            })
            .flatten()
            .collect();
        let mut s = VfSettings::default();
        let mine = infos.into_iter().find(|i| {
            i.0.iter()
                .any(|a| matches!(a, VfInfo::Mac(m) if m.vf_id == vf))
        });
        let Some(info) = mine else {
            return Err(LinkError::Op {
                what: format!("reading VF {vf} settings"),
                message: "the PF reports no such VF".into(),
            });
        };
        for a in &info.0 {
            match a {
                VfInfo::Mac(m) => s.mac = Some(m.mac[..6].try_into().expect("6 bytes")),
                VfInfo::Vlan(v) => {
                    let proto = s.vlan.map(|(_, _, p)| p).unwrap_or(false);
                    s.vlan = Some((v.vlan_id as u16, v.qos as u8, proto))
                }
                VfInfo::VlanList(l) => {
                    for v in l {
                        if let VfVlan::Info(i) = v {
                            s.vlan = Some((
                                i.vlan_id as u16,
                                i.qos as u8,
                                i.protocol == VlanProtocol::Ieee8021Ad,
                            ));
                        }
                    }
                }
                VfInfo::SpoofCheck(c) => s.spoofchk = Some(c.enabled),
                VfInfo::Trust(t) => s.trust = Some(t.enabled),
                VfInfo::LinkState(l) => {
                    s.link_state = Some(match l.state {
                        VfLinkState::Auto => 0,
                        VfLinkState::Enable => 1,
                        VfLinkState::Disable => 2,
                        _ => 0,
                    })
                }
                VfInfo::Rate(r) => s.rate = Some((r.min_tx_rate, r.max_tx_rate)),
                _ => {}
            }
        }
        Ok(s)
    }

    /// Sets, on PF link `pf`, the parts of `s` that are `Some` for VF `vf`; one request
    /// per setting, so an error names the one the PF refused.
    pub fn set_vf(&self, pf: u32, vf: u32, s: &VfSettings) -> Result<(), LinkError> {
        let mut items: Vec<(String, VfInfo)> = Vec::new();
        if let Some(m) = s.mac {
            items.push((
                format!("mac {}", format_mac(&m)),
                VfInfo::Mac(VfInfoMac::new(vf, &m)),
            ));
        }
        if let Some((id, qos, ad)) = s.vlan {
            let info = if ad {
                VfInfo::VlanList(vec![VfVlan::Info(VfVlanInfo::new(
                    vf,
                    id as u32,
                    qos as u32,
                    VlanProtocol::Ieee8021Ad,
                ))])
            } else {
                VfInfo::Vlan(VfInfoVlan::new(vf, id as u32, qos as u32))
            };
            items.push((
                format!(
                    "vlan {id} qos {qos}{}",
                    if ad { " proto 802.1ad" } else { "" }
                ),
                info,
            ));
        }
        if let Some(c) = s.spoofchk {
            items.push((
                format!("spoofchk {}", if c { "on" } else { "off" }),
                VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, c)),
            ));
        }
        if let Some(t) = s.trust {
            items.push((
                format!("trust {}", if t { "on" } else { "off" }),
                VfInfo::Trust(VfInfoTrust::new(vf, t)),
            ));
        }
        if let Some(l) = s.link_state {
            let state = match l {
                1 => VfLinkState::Enable,
                2 => VfLinkState::Disable,
                _ => VfLinkState::Auto,
            };
            items.push((
                format!("link_state {l}"),
                VfInfo::LinkState(VfInfoLinkState::new(vf, state)),
            ));
        }
        if let Some((min, max)) = s.rate {
            items.push((
                format!("rate min {min} max {max}"),
                VfInfo::Rate(VfInfoRate::new(vf, min, max)),
            ));
        }
        for (what, info) in items {
            let msg = LinkUnspec::new_with_index(pf)
                .append_extra_attribute(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![info])]))
                .build();
            self.rt
                .block_on(self.handle.link().set(msg).execute())
                .map_err(op(format!("setting VF {vf} {what} on the PF")))?;
        }
        Ok(())
    }

    pub fn add_address(&self, index: u32, addr: IpAddr, prefix: u8) -> Result<(), LinkError> {
        self.rt
            .block_on(self.handle.address().add(index, addr, prefix).execute())
            .map_err(op(format!("adding address {addr}/{prefix}")))
    }

    /// A route via `gw` (or on-link) to `dst/prefix` out of link `index`.
    pub fn add_route(
        &self,
        index: u32,
        dst: IpAddr,
        prefix: u8,
        gw: Option<IpAddr>,
    ) -> Result<(), LinkError> {
        let msg = match (dst, gw) {
            (IpAddr::V4(d), g) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .destination_prefix(d, prefix)
                    .output_interface(index);
                if let Some(IpAddr::V4(g)) = g {
                    b = b.gateway(g);
                }
                b.build()
            }
            (IpAddr::V6(d), g) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                    .destination_prefix(d, prefix)
                    .output_interface(index);
                if let Some(IpAddr::V6(g)) = g {
                    b = b.gateway(g);
                }
                b.build()
            }
        };
        self.rt
            .block_on(self.handle.route().add(msg).execute())
            .map_err(op(format!("adding route {dst}/{prefix}")))
    }
}
