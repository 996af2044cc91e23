//! Pure: what an upstream of the module is — its servers, how they are balanced and how their
//! health is checked. The route schema, the balancer and the health checks all build on it.

use std::net::{IpAddr, SocketAddr};

/// Servers in one upstream.
pub const MAX_SERVERS: usize = 256;
/// Largest server weight.
pub const MAX_WEIGHT: u32 = 1000;

/// How the module balances a `servers` upstream and judges its servers' health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub balance: Balance,
    /// Failures within `fail_timeout` that take a server out; 0 turns passive checks off.
    pub max_fails: u32,
    pub fail_timeout_ms: u64,
    pub check: Option<CheckDef>,
    /// A server first seen by an upstream with a check starts as down until it passes `rise`.
    pub start_down: bool,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            balance: Balance::RoundRobin,
            max_fails: 1,
            fail_timeout_ms: 10_000,
            check: None,
            start_down: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    Hash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    Tcp,
    Tls,
    Http,
}

/// An active check, run against every server of the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckDef {
    pub kind: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    /// Port for servers listed without one; else 443 for tcp and tls, 80 for http.
    pub port: Option<u16>,
    /// `tls`: the SNI to send; `http`: the Host. Default: the first route naming the upstream.
    pub name: Option<String>,
    /// `http`: the path requested.
    pub path: String,
    /// `http`: accepted status classes, bit N for Nxx.
    pub expect: u8,
    /// A PROXY protocol header sent first, for servers that listen with `proxy_protocol`.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// The PROXY protocol version a check speaks to a server that expects the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    V1,
    V2,
}

impl CheckDef {
    /// The port probed for a server listed without one.
    pub fn default_port(&self) -> u16 {
        self.port.unwrap_or(match self.kind {
            CheckKind::Tcp | CheckKind::Tls => 443,
            CheckKind::Http => 80,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerDef {
    pub ip: IpAddr,
    /// `None`: the port the client connected to.
    pub port: Option<u16>,
    pub weight: u32,
    pub backup: bool,
    /// Takes no new connection; the open ones continue (a cluster's node being drained).
    pub draining: bool,
}

impl ServerDef {
    /// The address as nginx names peers, without a port: `10.0.0.1`, `[2001:db8::1]`.
    pub fn host(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        }
    }
}

/// `addr` as the kernel takes it: a `sockaddr_in` or a `sockaddr_in6` in storage the size of
/// the latter, and its length.
pub fn socket_address(addr: SocketAddr) -> (libc::sockaddr_in6, u32) {
    // SAFETY: all-zero is a valid sockaddr_in6 (and sockaddr_in).
    let mut storage: libc::sockaddr_in6 = unsafe { core::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in is smaller than sockaddr_in6 and less strictly aligned.
            unsafe {
                core::ptr::from_mut(&mut storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            (storage, core::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            storage.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            storage.sin6_port = a.port().to_be();
            storage.sin6_addr.s6_addr = a.ip().octets();
            (storage, core::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// `address:port` into `out` (at least `address.len() + 6` bytes), as nginx names a peer;
/// returns the length. Costs a copy and five divisions, not core::fmt's thousand instructions.
pub fn peer_name(address: &str, port: u16, out: &mut [u8]) -> usize {
    let n = address.len();
    out[..n].copy_from_slice(address.as_bytes());
    out[n] = b':';
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut p = port;
    loop {
        i -= 1;
        digits[i] = b'0' + (p % 10) as u8;
        p /= 10;
        if p == 0 {
            break;
        }
    }
    let d = &digits[i..];
    out[n + 1..n + 1 + d.len()].copy_from_slice(d);
    n + 1 + d.len()
}
