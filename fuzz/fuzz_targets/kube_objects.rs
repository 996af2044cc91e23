//! Kubernetes lists and watch events on arbitrary bytes: never panic; whatever parses makes a
//! route document that merges into a table.
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
    for line in data.split(|&b| b == b'\n') {
        if let Ok(Event::Put(o, _)) = kube::parse_event(line, Kind::Ingress) {
            let _ = catalog.put(o);
        }
    }
    let _ = kube::looks_like_list(data);
    for upstream in [Some("u"), None] {
        let made = catalog.document("fuzz", upstream, None);
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
