//! The route table at 10, 10,000 and 1,000,000 routes: how long it takes to merge and compile,
//! how large its image is, and what a lookup costs (an exact name, a name under a wildcard,
//! a name that matches nothing), timed over a million lookups of names spread over the table.
//! Run by `nginx-test/bench/lookup`.

use std::hint::black_box;
use std::time::Instant;

use ngx_stream_edge_module::routes::document::Document;
use ngx_stream_edge_module::routes::source::parse_document;
use ngx_stream_edge_module::routes::table::RouteTable;
use ngx_stream_edge_module::sniff::Protocol;

fn table_text(routes: usize) -> String {
    let mut text = String::from(r#"{"upstreams": {"u": {"servers": ["10.0.0.1"]}}, "routes": {"#);
    for i in 0..routes {
        if i > 0 {
            text.push(',');
        }
        // One route in ten a wildcard.
        if i % 10 == 9 {
            text.push_str(&format!(r#""*.w{i}.example.com": "u""#));
        } else {
            text.push_str(&format!(r#""n{i}.example.com": "u""#));
        }
    }
    text.push_str("}}");
    text
}

fn per_lookup(table: &RouteTable, names: &[String]) -> f64 {
    let rounds = 1_000_000 / names.len().max(1);
    let start = Instant::now();
    for _ in 0..rounds {
        for name in names {
            black_box(table.lookup(Some(black_box(name)), Protocol::Tls));
        }
    }
    start.elapsed().as_nanos() as f64 / (rounds * names.len()) as f64
}

fn main() {
    println!("| routes | parse (ms) | merge and compile (ms) | image (MB) | exact (ns) | wildcard (ns) | miss (ns) |");
    println!("|---|---|---|---|---|---|---|");
    for routes in [10, 10_000, 1_000_000] {
        let text = table_text(routes);
        let start = Instant::now();
        let doc: Document = parse_document(text.as_bytes()).expect("the table parses");
        let parse = start.elapsed();
        let start = Instant::now();
        let (table, _) = RouteTable::merge(&[&doc], &|_| false).expect("the table merges");
        let merge = start.elapsed();
        drop(doc);
        // 1,000 names spread over the table, so that lookups do not all hit the cache.
        let step = (routes / 1000).max(1);
        let exact: Vec<String> = (0..routes)
            .step_by(step)
            .filter(|i| i % 10 != 9)
            .map(|i| format!("n{i}.example.com"))
            .collect();
        let wildcard: Vec<String> = (0..routes)
            .step_by(step)
            .filter(|i| i % 10 == 9)
            .map(|i| format!("a.b.w{i}.example.com"))
            .chain(std::iter::once("x.w9.example.com".to_owned()))
            .collect();
        let miss: Vec<String> = (0..1000).map(|i| format!("m{i}.nowhere.test")).collect();
        println!(
            "| {routes} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} |",
            parse.as_secs_f64() * 1000.0,
            merge.as_secs_f64() * 1000.0,
            table.image().bytes().len() as f64 / 1_048_576.0,
            per_lookup(&table, &exact),
            per_lookup(&table, &wildcard),
            per_lookup(&table, &miss),
        );
    }
}
