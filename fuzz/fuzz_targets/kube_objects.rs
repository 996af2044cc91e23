//! Kubernetes lists and watch events on arbitrary bytes, of every kind (Ingresses,
//! IngressClasses, routes with their status, Gateways with their listeners): never panic;
//! whatever parses makes a route document that merges into a table, with and without a class.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ngx_stream_edge_module::feed::kube::{self, Catalog, Event, Kind};
use ngx_stream_edge_module::routes::table::RouteTable;

fuzz_target!(|data: &[u8]| {
    let mut catalog = Catalog::default();
    if let Ok(page) = kube::parse_list(data, None) {
        for o in page.objects {
            let _ = catalog.put(o);
        }
    }
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        let kind = Kind::ALL[i % Kind::ALL.len()];
        match kube::parse_event(line, kind) {
            Ok(Event::Put(o, _)) => {
                let _ = catalog.put(o);
            }
            Ok(Event::Delete(o, _)) => {
                let _ = catalog.delete(&o);
            }
            _ => {}
        }
    }
    let _ = kube::looks_like_list(data);
    for (upstream, class) in [(Some("u"), None), (None, None), (Some("u"), Some("nginx"))] {
        let made = catalog.document("fuzz", upstream, class);
        let mut doc = made.document;
        if upstream.is_some() {
            doc.upstreams.push(ngx_stream_edge_module::routes::document::UpstreamDef {
                name: "u".into(),
                kind: ngx_stream_edge_module::routes::document::UpstreamKind::Nginx("n".into()),
                policy: Default::default(),
            });
        }
        RouteTable::merge(&[&doc], &|_| true).expect("a made document merges");
    }
});
