//! The NPWG `default-route` selection: the pod's default route moves to the gateway
//! named on an attachment's interface.

use crate::netns;
use crate::records::Attachment;
use futures_util::TryStreamExt;
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("default-route: cannot enter pod netns {netns}: {source}")]
    Netns {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("default-route via {gateway} on {ifname}: {message}")]
    Netlink {
        gateway: IpAddr,
        ifname: String,
        message: String,
    },
}

/// For each attachment with `default_route`, replaces the pod's default route of that
/// address family with one via the gateway on the attachment's interface.
pub fn apply_default_routes(netns: &str, attachments: &[Attachment]) -> Result<(), RouteError> {
    let wanted: Vec<(String, IpAddr)> = attachments
        .iter()
        .flat_map(|a| a.default_route.iter().map(|gw| (a.ifname.clone(), *gw)))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    netns::run_in(Path::new(netns), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| (wanted[0].clone(), e.to_string()))?;
        rt.block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| (wanted[0].clone(), e.to_string()))?;
            tokio::spawn(conn);
            for (ifname, gw) in &wanted {
                replace_default(&handle, ifname, *gw)
                    .await
                    .map_err(|e| ((ifname.clone(), *gw), e))?;
            }
            Ok(())
        })
    })
    .map_err(|source| RouteError::Netns {
        netns: netns.to_string(),
        source,
    })?
    .map_err(|((ifname, gateway), message)| RouteError::Netlink {
        gateway,
        ifname,
        message,
    })
}

async fn replace_default(
    handle: &rtnetlink::Handle,
    ifname: &str,
    gw: IpAddr,
) -> Result<(), String> {
    let mut links = handle.link().get().match_name(ifname.to_string()).execute();
    let link = links
        .try_next()
        .await
        .map_err(|e| format!("no interface {ifname} in the pod: {e}"))?
        .ok_or_else(|| format!("no interface {ifname} in the pod"))?;
    let index = link.header.index;
    let (query, family) = match gw {
        IpAddr::V4(_) => (
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            AddressFamily::Inet,
        ),
        IpAddr::V6(_) => (
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
            AddressFamily::Inet6,
        ),
    };
    let existing: Vec<RouteMessage> = handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("cannot list routes: {e}"))?;
    for r in existing.into_iter().filter(|r| is_main_default(r, family)) {
        handle
            .route()
            .del(r)
            .execute()
            .await
            .map_err(|e| format!("cannot remove the old default route: {e}"))?;
    }
    let route = match gw {
        IpAddr::V4(g) => RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(g)
            .output_interface(index)
            .build(),
        IpAddr::V6(g) => RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(g)
            .output_interface(index)
            .build(),
    };
    handle
        .route()
        .add(route)
        .execute()
        .await
        .map_err(|e| format!("cannot add the default route: {e}"))
}

fn is_main_default(r: &RouteMessage, family: AddressFamily) -> bool {
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table as u32);
    r.header.address_family == family
        && r.header.destination_prefix_length == 0
        && table == RouteHeader::RT_TABLE_MAIN as u32
}
