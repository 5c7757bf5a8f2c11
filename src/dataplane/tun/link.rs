//! Link configuration of the TUN device through netlink: MTU, queue length,
//! up, and a route for every service CIDR. Nothing here runs `ip`.

use std::ffi::CString;
use std::net::IpAddr;

use ipnet::IpNet;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

/// What the TUN link should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Device name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// Transmit queue length (the default 500 drops under a large window).
    pub txqueuelen: u32,
    /// Prefixes routed into the device.
    pub routes: Vec<IpNet>,
}

/// Netlink refused a change.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No such device.
    #[error("no network device named {0:?}")]
    NoDevice(String),
    /// Opening the netlink socket failed.
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    /// A request failed.
    #[error("{what} on {dev}: {source}")]
    Request {
        /// What was asked.
        what: String,
        /// Device.
        dev: String,
        /// Cause.
        #[source]
        source: rtnetlink::Error,
    },
    /// A prefix cannot be a route.
    #[error("route {0}: {1}")]
    Route(IpNet, String),
}

fn index_of(name: &str) -> Result<u32, LinkError> {
    let c = CString::new(name).map_err(|_| LinkError::NoDevice(name.to_string()))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(LinkError::NoDevice(name.to_string()));
    }
    Ok(idx)
}

/// Applies `cfg` (idempotent: routes are replaced, not duplicated).
pub async fn configure(cfg: &LinkConfig) -> Result<(), LinkError> {
    let idx = index_of(&cfg.name)?;
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let req = |what: &str, source| LinkError::Request {
        what: what.to_string(),
        dev: cfg.name.clone(),
        source,
    };
    let msg = LinkUnspec::new_with_index(idx)
        .mtu(cfg.mtu)
        .txqueuelen(cfg.txqueuelen)
        .up()
        .build();
    let res = async {
        handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| req(&format!("setting mtu {} and up", cfg.mtu), e))?;
        for net in &cfg.routes {
            let route = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .map_err(|e| LinkError::Route(*net, e.to_string()))?
                .output_interface(idx)
                .build();
            handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|e| req(&format!("adding route {net}"), e))?;
        }
        Ok(())
    }
    .await;
    conn.abort();
    res
}
