//! Kubernetes lists and watch events on arbitrary bytes, of every kind (Ingresses,
//! IngressClasses, routes with their status, Gateways with their listeners, Nodes): never
//! panic; whatever parses makes a route document that merges into a table, with and without a
//! class, and nodes that an upstream discovering them (with a selector from the same bytes)
//! takes. The document the feed makes of a catalog is the one its cache file reads back as
//! (the table takes the first for the second).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ngx_stream_edge_module::feed::kube::{self, Catalog, Event, Kind};
use ngx_stream_edge_module::routes::discover;
use ngx_stream_edge_module::routes::document::{Document, UpstreamDef, UpstreamKind};
use ngx_stream_edge_module::routes::table::{Discovery, RouteTable};

fuzz_target!(|data: &[u8]| {
    let mut catalog = Catalog::default();
    if let Ok(page) = kube::parse_list(data, None) {
        for o in page.objects {
            let _ = catalog.put(std::sync::Arc::unwrap_or_clone(o));
        }
    }
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        let kind = Kind::ANY[i % Kind::ANY.len()];
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
    let objects: Vec<_> = catalog.objects.values().cloned().collect();
    let back = kube::Cache::parse(&kube::Cache::bytes_of("fuzz", &objects))
        .expect("a cache written reads back");
    for upstream in [Some("u"), None] {
        let made = kube::document_of(objects.iter().map(|o| &**o), "fuzz", upstream, None)
            .with_discovered(Some(std::sync::Arc::new(kube::discovered_of(objects.iter().map(|o| &**o), "fuzz"))));
        let read = back
            .document("fuzz", upstream, None)
            .with_discovered(Some(std::sync::Arc::new(back.discovered("fuzz"))));
        assert_eq!(made, read, "the document made is the one read back");
    }
    for (upstream, class) in [(Some("u"), None), (None, None), (Some("u"), Some("nginx"))] {
        let made = catalog.document("fuzz", upstream, class);
        let mut doc = made.document;
        if upstream.is_some() {
            doc.upstreams.push(UpstreamDef {
                name: "u".into(),
                kind: UpstreamKind::Nginx("n".into()),
                policy: Default::default(),
                limits: None,
            });
        }
        RouteTable::merge(&[&doc], &|_| true).expect("a made document merges");
    }
    let selector = std::str::from_utf8(data.split(|&b| b == b'\n').next().unwrap_or_default())
        .ok()
        .and_then(|text| discover::Selector::parse(text).ok())
        .unwrap_or_default();
    let mut doc = Document {
        discovered: Some(std::sync::Arc::new(catalog.discovered("fuzz"))),
        ..Document::default()
    };
    doc.upstreams.push(UpstreamDef {
        name: "nodes".into(),
        kind: UpstreamKind::Discover(discover::Discover {
            source: "fuzz".into(),
            what: discover::What::Nodes(selector),
        }),
        policy: Default::default(),
        limits: None,
    });
    for address in [discover::Address::Pod, discover::Address::Node] {
        doc.upstreams.push(UpstreamDef {
            name: format!("service-{address:?}"),
            kind: UpstreamKind::Discover(discover::Discover {
                source: "fuzz".into(),
                what: discover::What::Service {
                    namespace: "ns".into(),
                    name: "svc".into(),
                    address,
                    port: None,
                },
            }),
            policy: Default::default(),
            limits: None,
        });
    }
    doc.upstreams.push(UpstreamDef {
        name: "nodeport".into(),
        kind: UpstreamKind::Discover(discover::Discover {
            source: "fuzz".into(),
            what: discover::What::NodePort {
                namespace: "ns".into(),
                name: "svc".into(),
            },
        }),
        policy: Default::default(),
        limits: None,
    });
    let all = discover::Kinds {
        nodes: true,
        endpoints: true,
        services: true,
    };
    let discovery = Discovery {
        sources: vec![("fuzz".into(), all)],
        ..Discovery::default()
    };
    let (table, _) =
        RouteTable::merge_with(&[&doc], &|_| true, &discovery).expect("discovered servers merge");
    assert!(table.discovered_servers().values().all(|s| s.len() <= 256));
});
