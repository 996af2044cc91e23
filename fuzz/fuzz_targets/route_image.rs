//! The route image reader on corrupt images: an image built from names in the input, then
//! bytes of it (header and body) overwritten from the input and the checksum made to match,
//! so that the layout checks behind it are reached. Opening never panics or reads out of
//! bounds; an image that opens answers lookups without panicking, and one left intact finds
//! every name it was built with. Every image that opens is also made into a route table, as
//! a worker does with a published image, and looked up through it: exact names, names below
//! the wildcards, names the table does not have, and no name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ngx_stream_edge_module::routes::document::UpstreamKind;
use ngx_stream_edge_module::routes::image::{reseal, Builder, Image, Targets, UpstreamSpec, NONE, NO_ORIGIN};
use ngx_stream_edge_module::routes::limits::{Limits, Network, Rate};
use ngx_stream_edge_module::routes::table::RouteTable;
use ngx_stream_edge_module::sniff::Protocol;
use ngx_stream_edge_module::upstream::{CheckDef, CheckKind, Policy, ProxyProtocol, ServerDef};

fuzz_target!(|data: &[u8]| {
    // names | edits: "\0" separates them; names are split on '\n'.
    let (names, edits) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let mut seen = std::collections::HashSet::new();
    let names: Vec<&[u8]> = names
        .split(|&b| b == b'\n')
        .filter(|n| !n.is_empty() && n.len() < 256 && n.is_ascii() && seen.insert(n.to_vec()))
        .collect();
    let servers = UpstreamKind::Servers(vec![
        ServerDef { ip: [10, 0, 0, 1].into(), port: None, weight: 1, backup: false, draining: false },
        ServerDef { ip: "2001:db8::1".parse().unwrap(), port: Some(8443), weight: 5, backup: true, draining: true },
    ]);
    let checked = Policy {
        check: Some(CheckDef {
            kind: CheckKind::Http,
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
            port: Some(8080),
            name: None,
            path: "/healthz".into(),
            expect: 0b100,
            proxy_protocol: Some(ProxyProtocol::V1),
        }),
        ..Policy::default()
    };
    let plain = Policy::default();
    let nginx = UpstreamKind::Nginx("vhosts".into());
    let mut b = Builder::default();
    b.upstream(UpstreamSpec { name: "a", kind: &servers, policy: &checked, check_name: Some("a.test"), discovered: false, port_map: &[] });
    b.upstream(UpstreamSpec { name: "b", kind: &servers, policy: &plain, check_name: None, discovered: true, port_map: &[(443, 30443)] });
    b.upstream(UpstreamSpec { name: "c", kind: &nginx, policy: &plain, check_name: None, discovered: false, port_map: &[] });
    let origins = [b.origin("/etc/nginx/edge/a.json"), b.origin("cluster-a"), NO_ORIGIN];
    let net = |s: &str| Network::parse(s).unwrap();
    let limited = b.limits(Limits {
        max_conns: Some(10),
        max_conns_per_client: Some(2),
        rate: Some(Rate { count: 50, per_minute: false }),
        burst: Some(10),
        allow: Some(vec![net("10.0.0.0/8"), net("2001:db8::/32")]),
        deny: Some(vec![net("10.9.0.0/16")]),
    });
    let denied = b.limits(Limits { deny: Some(vec![net("all")]), ..Limits::default() });
    for (i, n) in names.iter().enumerate() {
        let n = std::str::from_utf8(n).unwrap();
        let to = Targets { tls: i as u32 % 3, http: if i % 2 == 0 { NONE } else { 1 } };
        let limits = [[NONE, NONE], [limited, NONE], [denied, limited]][i % 3];
        if i % 4 == 3 {
            b.wildcard_limited(n, to, i % 8 == 7, origins[i % 3], limits);
        } else {
            b.exact_limited(n, to, origins[i % 3], limits);
        }
    }
    b.set_default_limited(Targets { tls: 2, http: NONE }, NO_ORIGIN, [limited, NONE]);
    let image = b.build();
    let mut bytes = image.bytes().to_vec();
    // Each edit: a 2-byte position and a byte.
    for e in edits.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([e[0], e[1]]));
        if at < bytes.len() {
            bytes[at] = e[2];
        }
    }
    if edits.len() % 3 == 1 {
        bytes.truncate(usize::from(edits[edits.len() - 1]));
    }
    let intact = bytes == image.bytes();
    reseal(&mut bytes);
    match Image::from_bytes(bytes) {
        Ok(opened) => {
            let v = opened.view();
            for (i, n) in names.iter().enumerate() {
                let found = if i % 4 == 3 { v.wildcard(n).map(|(k, t, _)| (k, t)) } else { v.exact(n) };
                let origin = if i % 4 == 3 { v.wildcard_origin(n) } else { v.exact_origin(n) };
                if intact {
                    assert_eq!(origin.is_some(), i % 3 != 2);
                }
                if intact {
                    assert!(found.is_some(), "{:?}", String::from_utf8_lossy(n));
                }
            }
            let _ = v.exact(b"not.in.the.table");
            for u in 0..v.upstream_count() {
                let e = v.upstream(u);
                let _ = (e.name(), e.nginx(), e.servers(), e.policy(), e.check_name());
            }
            if intact {
                assert_eq!(v.upstream_count(), 3);
                assert_eq!(v.upstream(0).policy(), checked);
            }
            let _ = (v.default(), v.default_origin());
            let _ = v.routes().count();
            let table = RouteTable::from_image(opened);
            for (i, n) in names.iter().enumerate() {
                let n = std::str::from_utf8(n).unwrap();
                for protocol in [Protocol::Tls, Protocol::Http] {
                    let found = table.lookup(Some(n), protocol);
                    let below = table.lookup(Some(&format!("x.y.{n}")), protocol);
                    // An exact name with no http target falls through to the wildcards.
                    let to = match protocol {
                        Protocol::Tls => Some(i % 3),
                        Protocol::Http => (i % 2 == 1).then_some(1),
                    };
                    if let (true, false, Some(to)) = (intact, i % 4 == 3, to) {
                        assert_eq!(found.as_ref().map(|m| &*m.upstream.name), Some(["a", "b", "c"][to]), "{n}");
                        let l = found.as_ref().and_then(|m| table.limits(m.limits));
                        let want = match (i % 3, protocol) {
                            (1, Protocol::Tls) | (2, Protocol::Http) => Some(10),
                            (2, Protocol::Tls) => Some(0),
                            _ => None,
                        };
                        assert_eq!(l.map(|l| l.max_conns), want, "{n}");
                    }
                    if let Some(l) = found.as_ref().and_then(|m| table.limits(m.limits)) {
                        let v = table.image().view();
                        let _ = (v.allows(&l, "10.1.2.3".parse().unwrap()), v.networks(&l), l.interval_us());
                    }
                    let _ = below.map(|m| m.by.to_string());
                }
            }
            for protocol in [Protocol::Tls, Protocol::Http] {
                let _ = table.lookup(Some("not.in.the.table"), protocol);
                let _ = table.lookup(None, protocol);
            }
            let _ = (table.route_count(), table.checked().count());
        }
        Err(e) => assert!(!intact, "an intact image was refused: {e}"),
    }
});
