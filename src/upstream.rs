//! Pure: what an upstream of the module is — its servers, how they are balanced and how their
//! health is checked. The route schema, the balancer and the health checks all build on it.

use std::net::IpAddr;

/// Servers in one upstream.
pub const MAX_SERVERS: usize = 256;

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
