//! `"limits"` of a route or an upstream, as `document` reads them from a route file. A route's
//! fields override its upstream's one by one (`Limits::over`); the image keeps the result per
//! route and protocol.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Largest `max_conns` and `burst`, and the most connections a `rate` may name.
pub const MAX_CONNS: u32 = 1_000_000;
/// Largest `max_conns_per_client`.
pub const MAX_CONNS_PER_CLIENT: u32 = 100_000;
/// Networks in one `allow` or `deny` list.
pub const MAX_NETWORKS: usize = 1_000;
/// Networks in all the distinct sets of limits of a table.
pub const MAX_TABLE_NETWORKS: usize = 1_000_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    pub max_conns: Option<u32>,
    pub max_conns_per_client: Option<u32>,
    pub rate: Option<Rate>,
    pub burst: Option<u32>,
    pub allow: Option<Vec<Network>>,
    pub deny: Option<Vec<Network>>,
}

/// New connections per second or per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub per_minute: bool,
}

impl Rate {
    /// Microseconds between two connections at this rate.
    pub fn interval_us(self) -> u64 {
        let period: u64 = if self.per_minute {
            60_000_000
        } else {
            1_000_000
        };
        (period / u64::from(self.count.max(1))).max(1)
    }

    /// `50r/s`, `600r/m`, as nginx's `limit_req_zone` writes a rate.
    pub fn parse(text: &str) -> Option<Rate> {
        let (count, unit) = text.split_once("r/")?;
        let per_minute = match unit {
            "s" => false,
            "m" => true,
            _ => return None,
        };
        if count.is_empty() || count.len() > 7 || !count.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let count: u32 = count.parse().ok()?;
        (1..=MAX_CONNS)
            .contains(&count)
            .then_some(Rate { count, per_minute })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}r/{}",
            self.count,
            if self.per_minute { "m" } else { "s" }
        )
    }
}

/// A network of client addresses, IPv4 kept as IPv4-mapped IPv6 (its prefix plus 96).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Network {
    pub addr: Ipv6Addr,
    pub prefix: u8,
}

impl Network {
    /// `10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`, `::1`, or `all`.
    pub fn parse(text: &str) -> Result<Network, String> {
        if text == "all" {
            return Ok(Network {
                addr: Ipv6Addr::UNSPECIFIED,
                prefix: 0,
            });
        }
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (text, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("\"{text}\" is not an address, a network (addr/bits) or all"))?;
        let (addr, max, offset) = match ip {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 32, 96),
            IpAddr::V6(v6) => (v6, 128, 0),
        };
        let bits = match prefix {
            None => max,
            Some(b) => match b.parse::<u8>() {
                Ok(n) if n <= max && !b.starts_with('+') => n,
                _ => return Err(format!("\"{text}\": the prefix is 0 to {max} bits")),
            },
        };
        let net = Network {
            addr,
            prefix: bits + offset,
        };
        if net.masked(addr) != addr {
            return Err(format!(
                "\"{text}\" has bits set past its /{bits} prefix (write the network's first address)"
            ));
        }
        Ok(net)
    }

    fn masked(&self, ip: Ipv6Addr) -> Ipv6Addr {
        let bits = u128::from(ip);
        let mask = if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix))
        };
        Ipv6Addr::from(bits & mask)
    }

    /// Whether `ip` is in the network (an IPv4 address matches IPv4 networks and `all`).
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        self.masked(ip) == self.addr
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == 0 {
            return f.write_str("all");
        }
        match self.addr.to_ipv4_mapped() {
            Some(v4) if self.prefix >= 96 => write!(f, "{v4}/{}", self.prefix - 96),
            _ => write!(f, "{}/{}", self.addr, self.prefix),
        }
    }
}

impl Limits {
    /// This route's limits over its upstream's: each field the route sets wins.
    pub fn over(route: Option<&Limits>, upstream: Option<&Limits>) -> Limits {
        let (r, u) = (route.cloned().unwrap_or_default(), upstream);
        let or = |mine: Option<u32>, theirs: Option<u32>| mine.or(theirs);
        Limits {
            max_conns: or(r.max_conns, u.and_then(|u| u.max_conns)),
            max_conns_per_client: or(
                r.max_conns_per_client,
                u.and_then(|u| u.max_conns_per_client),
            ),
            // A rate and its burst go together: a route's rate does not take the upstream's
            // burst.
            burst: if r.rate.is_some() {
                r.burst
            } else {
                or(r.burst, u.and_then(|u| u.burst))
            },
            rate: r.rate.or(u.and_then(|u| u.rate)),
            allow: r.allow.or_else(|| u.and_then(|u| u.allow.clone())),
            deny: r.deny.or_else(|| u.and_then(|u| u.deny.clone())),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// Whether a client at `ip` may connect: not on `deny`, and on `allow` if there is one.
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.deny.iter().flatten().any(|n| n.contains(ip)) {
            return false;
        }
        self.allow
            .as_ref()
            .is_none_or(|list| list.iter().any(|n| n.contains(ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::document::{limits_of, JsonPath};
    use crate::routes::json::Json;

    fn parse(text: &str) -> Result<Limits, String> {
        let json: Json = serde_json::from_str(text).map_err(|e| e.to_string())?;
        limits_of(&json, &JsonPath::Key(&JsonPath::Root, "limits")).map_err(|e| e.to_string())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_field_is_read() {
        let l = parse(
            r#"{"max_conns": 10, "max_conns_per_client": 2, "rate": "50r/s", "burst": 10,
                "allow": ["10.0.0.0/8", "2001:db8::/32"], "deny": ["10.9.0.0/16"]}"#,
        )
        .unwrap();
        assert_eq!(l.max_conns, Some(10));
        assert_eq!(l.max_conns_per_client, Some(2));
        assert_eq!(
            l.rate,
            Some(Rate {
                count: 50,
                per_minute: false
            })
        );
        assert_eq!(l.rate.unwrap().interval_us(), 20_000);
        assert_eq!(l.rate.unwrap().to_string(), "50r/s");
        assert_eq!(l.burst, Some(10));
        assert!(l.allows(ip("10.1.2.3")));
        assert!(!l.allows(ip("10.9.2.3")));
        assert!(!l.allows(ip("192.168.1.1")));
        assert!(l.allows(ip("2001:db8::5")));
        assert!(!l.allows(ip("2001:db9::5")));
        assert_eq!(Rate::parse("600r/m").unwrap().interval_us(), 100_000);
    }

    #[test]
    fn bad_limits_say_where_and_why() {
        for (text, want) in [
            (
                r#"{"max_conns": 0}"#,
                "limits.max_conns: expected an integer from 1 to 1000000",
            ),
            (r#"{"rate": "50/s"}"#, "limits.rate: \"50/s\" is not a rate"),
            (r#"{"rate": "0r/s"}"#, "is not a rate"),
            (r#"{"rate": "5r/h"}"#, "is not a rate"),
            (r#"{"burst": 5}"#, "limits.burst: goes with a rate"),
            (
                r#"{"allow": []}"#,
                "limits.allow: expected 1 to 1000 networks",
            ),
            (
                r#"{"deny": ["10.0.0.1/8"]}"#,
                "limits.deny[0]: \"10.0.0.1/8\" has bits set past its /8 prefix",
            ),
            (r#"{"deny": ["10.0.0.0/33"]}"#, "the prefix is 0 to 32 bits"),
            (r#"{"deny": ["example.com"]}"#, "is not an address"),
            (
                r#"{"deny": "all"}"#,
                "limits.deny: expected an array, found a string",
            ),
            (r#"{"max_con": 1}"#, "limits.max_con: unknown field"),
            (r#"[1]"#, "limits: expected an object"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn networks_match_their_family() {
        let all = Network::parse("all").unwrap();
        assert!(all.contains(ip("1.2.3.4")) && all.contains(ip("::1")));
        let host = Network::parse("192.0.2.7").unwrap();
        assert!(host.contains(ip("192.0.2.7")) && !host.contains(ip("192.0.2.8")));
        assert_eq!(host.to_string(), "192.0.2.7/32");
        let v6 = Network::parse("2001:db8::/32").unwrap();
        assert!(!v6.contains(ip("10.0.0.1")));
        assert_eq!(v6.to_string(), "2001:db8::/32");
        assert_eq!(
            Network::parse("0.0.0.0/0").unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert!(!Network::parse("0.0.0.0/0").unwrap().contains(ip("::1")));
    }

    #[test]
    fn a_route_overrides_its_upstream_field_by_field() {
        let up =
            parse(r#"{"max_conns": 100, "rate": "10r/s", "burst": 5, "deny": ["10.0.0.0/8"]}"#)
                .unwrap();
        let route = parse(r#"{"max_conns_per_client": 3, "rate": "1r/s"}"#).unwrap();
        let l = Limits::over(Some(&route), Some(&up));
        assert_eq!(l.max_conns, Some(100));
        assert_eq!(l.max_conns_per_client, Some(3));
        assert_eq!(l.rate.unwrap().count, 1);
        assert_eq!(
            l.burst, None,
            "the route's rate comes without the upstream's burst"
        );
        assert!(!l.allows(ip("10.0.0.1")));
        assert_eq!(Limits::over(None, Some(&up)), up);
        assert!(Limits::over(None, None).is_empty());
    }
}
