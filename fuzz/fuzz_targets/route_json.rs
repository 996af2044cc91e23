//! The route-file loader on arbitrary bytes: JSON parse, schema check, merge and lookups never
//! panic; a table that loads answers lookups for the names it lists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ngx_stream_edge_module::routes::document::RouteKey;
use ngx_stream_edge_module::routes::source::parse_document;
use ngx_stream_edge_module::routes::table::RouteTable;
use ngx_stream_edge_module::sniff::Protocol;

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = parse_document(data) else {
        return;
    };
    let Ok((table, _)) = RouteTable::merge(&[&doc], &|name| name.len() % 2 == 0) else {
        return;
    };
    for (key, targets) in &doc.routes {
        if let RouteKey::Exact(name) = key {
            if targets.tls.is_some() {
                assert!(table.lookup(Some(name), Protocol::Tls).is_some(), "{name}");
            }
        }
    }
    let _ = table.lookup(None, Protocol::Http);
});
