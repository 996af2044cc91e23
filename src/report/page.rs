//! The status page for a browser: one self-contained HTML document (no script, no external
//! asset), rendered on the server from the same value as the status JSON, so that it shows
//! the state at load time with JavaScript off; it reloads itself every few seconds.

use std::fmt::Write;

use serde_json::Value;

/// Seconds between reloads.
const REFRESH_S: u32 = 5;
/// Rows of the busiest routes and of each protocol's unrouted names.
const ROWS: usize = 25;

/// Text for HTML content and attribute values: `<`, `>`, `&`, `"` and `'` escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as a table cell's text.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::String(s) => escape(s),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        other => escape(&other.to_string()),
    }
}

/// Unix seconds as a UTC time of day (`12:04:31`), with the date when `now` is another day.
fn time(v: &Value, now: f64) -> String {
    let Some(t) = v.as_f64() else {
        return "–".into();
    };
    let secs = t as u64;
    let (day, s) = (secs / 86_400, secs % 86_400);
    let clock = format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
    if day == now as u64 / 86_400 {
        clock
    } else {
        let (y, m, d) = civil(day as i64);
        format!("{y}-{m:02}-{d:02} {clock}")
    }
}

/// The Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Bytes in a short human form: `812 B`, `14.2 KB`, `3.1 GB`.
fn bytes(v: &Value) -> String {
    let Some(mut n) = v.as_f64() else {
        return "–".into();
    };
    for unit in ["B", "KB", "MB", "GB", "TB"] {
        if n < 1000.0 || unit == "TB" {
            return if unit == "B" {
                format!("{n} {unit}")
            } else {
                format!("{n:.1} {unit}")
            };
        }
        n /= 1000.0;
    }
    unreachable!()
}

fn badge(state: &str) -> String {
    let class = match state {
        "up" | "watching" | "polling" => "ok",
        "draining" | "checking" | "listing" | "starting" => "warn",
        _ => "bad",
    };
    format!("<span class=\"b {class}\">{}</span>", escape(state))
}

const STYLE: &str = "\
:root{color-scheme:light dark;--bg:#fff;--fg:#1d2329;--mute:#5f6b76;--line:#d9dee3;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e}\
@media(prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--mute:#8d96a0;--line:#30363d;--ok:#3fb950;--warn:#d29922;--bad:#f85149}}\
body{margin:0;padding:12px;background:var(--bg);color:var(--fg);font:14px/1.4 system-ui,sans-serif}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 6px}\
.sub{color:var(--mute);margin:0 0 8px}.wrap{overflow-x:auto}\
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}\
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);white-space:nowrap}\
th{color:var(--mute);font-weight:600}td.n,th.n{text-align:right}\
.b{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;border:1px solid currentColor}\
.ok{color:var(--ok)}.warn{color:var(--warn)}.bad{color:var(--bad)}\
.cards{display:flex;flex-wrap:wrap;gap:8px}.card{border:1px solid var(--line);border-radius:6px;padding:6px 10px;min-width:120px}\
.card b{display:block;font-size:18px}code{font-size:13px}";

/// Writes a table: `head` are the column titles (a leading `#` right-aligns a numeric one).
fn table(out: &mut String, id: &str, head: &[&str], rows: &[Vec<String>], empty: &str) {
    if rows.is_empty() {
        let _ = writeln!(out, "<p class=\"sub\" id=\"{id}\">{}</p>", escape(empty));
        return;
    }
    let _ = write!(out, "<div class=\"wrap\"><table id=\"{id}\"><thead><tr>");
    for h in head {
        match h.strip_prefix('#') {
            Some(h) => {
                let _ = write!(out, "<th class=\"n\">{h}</th>");
            }
            None => {
                let _ = write!(out, "<th>{h}</th>");
            }
        }
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for (cell, h) in row.iter().zip(head) {
            let class = if h.starts_with('#') {
                " class=\"n\""
            } else {
                ""
            };
            let _ = write!(out, "<td{class}>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div>\n");
}

/// The page for the status value `v` (as `/status` answers it), at Unix time `now`.
pub fn render(v: &Value, now: f64) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\"><title>nginx-edge status</title>\
<style>{STYLE}</style></head><body>\n<h1>nginx-edge</h1><p class=\"sub\">version {} · \
{} UTC · reloads every {REFRESH_S} s · <a href=\"/status\">JSON</a> · \
<a href=\"/metrics\">metrics</a></p>\n",
        text(&v["version"]),
        time(&Value::from(now), now)
    );
    summary(&mut out, v);
    sources(&mut out, v, now);
    upstreams(&mut out, v, now);
    routes(&mut out, v, now);
    unrouted(&mut out, v, now);
    out.push_str("</body></html>\n");
    out
}

fn summary(out: &mut String, v: &Value) {
    let servers: Vec<&Value> = v["upstreams"]
        .as_object()
        .into_iter()
        .flat_map(|u| u.values())
        .flat_map(|u| u["servers"].as_array().into_iter().flatten())
        .collect();
    let count = |state: &str| servers.iter().filter(|s| s["state"] == state).count();
    let routes: u64 = v["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["routes"].as_u64())
        .sum();
    let unrouted: u64 = ["tls", "http"]
        .iter()
        .map(|p| {
            v["unrouted"][*p]["defaulted"].as_u64().unwrap_or(0)
                + v["unrouted"][*p]["closed"].as_u64().unwrap_or(0)
        })
        .sum();
    let cards = [
        ("routes", routes.to_string(), ""),
        ("servers up", count("up").to_string(), "ok"),
        ("draining", count("draining").to_string(), "warn"),
        (
            "down",
            (count("down") + count("checking")).to_string(),
            "bad",
        ),
        ("unrouted connections", unrouted.to_string(), ""),
    ];
    out.push_str("<div class=\"cards\" id=\"summary\">");
    for (label, n, class) in cards {
        let _ = write!(
            out,
            "<div class=\"card\"><b class=\"{class}\">{n}</b>{label}</div>"
        );
    }
    out.push_str("</div>\n");
}

fn sources(out: &mut String, v: &Value, now: f64) {
    out.push_str("<h2>Sources</h2>\n");
    let rows: Vec<Vec<String>> = v["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            vec![
                format!("<code>{}</code>", text(&s["path"])),
                text(&s["generation"]),
                text(&s["routes"]),
                text(&s["upstreams"]),
                time(&s["loaded_at"], now),
                match s["last_error"].as_str() {
                    Some(e) => format!("<span class=\"bad\">{}</span>", escape(e)),
                    None => "–".into(),
                },
            ]
        })
        .collect();
    table(
        out,
        "sources",
        &[
            "table",
            "#generation",
            "#routes",
            "#upstreams",
            "loaded",
            "last error",
        ],
        &rows,
        "no route source",
    );
    let rows: Vec<Vec<String>> = v["urls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|u| {
            vec![
                text(&u["name"]),
                badge(u["state"].as_str().unwrap_or("?")),
                text(&u["objects"]),
                text(&u["routes"]),
                time(&u["last_success"], now),
                match u["last_error"].as_str() {
                    Some(e) => format!("<span class=\"bad\">{}</span>", escape(e)),
                    None => "–".into(),
                },
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(
            out,
            "urls",
            &[
                "URL source",
                "state",
                "#objects",
                "#routes",
                "last answer",
                "last error",
            ],
            &rows,
            "",
        );
    }
}

fn upstreams(out: &mut String, v: &Value, now: f64) {
    out.push_str("<h2>Upstreams</h2>\n");
    let mut rows = Vec::new();
    let mut draining = Vec::new();
    for (name, u) in v["upstreams"].as_object().into_iter().flatten() {
        for s in u["servers"].as_array().into_iter().flatten() {
            let state = s["state"].as_str().unwrap_or("?");
            let check = &s["last_check"];
            let last_check = if check.is_null() {
                "–".into()
            } else {
                format!("{} at {}", text(&check["result"]), time(&check["at"], now))
            };
            let row = vec![
                escape(name),
                format!("<code>{}</code>", text(&s["address"])),
                badge(state),
                text(&s["active"]),
                text(&s["total"]),
                text(&s["fails"]),
                last_check,
            ];
            if state == "draining" {
                draining.push(row.clone());
            }
            rows.push(row);
        }
    }
    let head = [
        "upstream",
        "server",
        "state",
        "#active",
        "#total",
        "#fails",
        "last check",
    ];
    table(out, "servers", &head, &rows, "no upstream with servers");
    out.push_str("<h2>Draining</h2>\n");
    table(out, "draining", &head, &draining, "no server is draining");
}

fn routes(out: &mut String, v: &Value, now: f64) {
    let r = &v["routes"];
    let _ = writeln!(
        out,
        "<h2>Busiest routes</h2><p class=\"sub\">{} of {} tracked routes; {} evicted</p>",
        r["routes"].as_array().map_or(0, |a| a.len().min(ROWS)),
        text(&r["tracked"]),
        text(&r["evicted"])
    );
    let mut rows = Vec::new();
    for route in r["routes"].as_array().into_iter().flatten().take(ROWS) {
        for p in ["tls", "http"] {
            let c = &route[p];
            if c.is_null() {
                continue;
            }
            let refused: u64 = c["refused"]
                .as_object()
                .map_or(0, |o| o.values().filter_map(Value::as_u64).sum());
            rows.push(vec![
                format!("<code>{}</code>", text(&route["route"])),
                text(&route["match"]),
                p.into(),
                text(&c["connections"]),
                text(&c["active"]),
                bytes(&c["bytes_received"]),
                bytes(&c["bytes_sent"]),
                text(&c["failed"]),
                text(&c["no_server"]),
                refused.to_string(),
                time(&route["last_seen"], now),
            ]);
        }
    }
    table(
        out,
        "routes",
        &[
            "route",
            "match",
            "protocol",
            "#connections",
            "#active",
            "#received",
            "#sent",
            "#failed",
            "#no server",
            "#refused",
            "last seen",
        ],
        &rows,
        "no traffic yet (or edge_counters off)",
    );
}

fn unrouted(out: &mut String, v: &Value, now: f64) {
    let u = &v["unrouted"];
    out.push_str("<h2>Names nobody routes</h2>\n");
    let mut names: Vec<(&str, &Value)> = ["tls", "http"]
        .into_iter()
        .flat_map(|p| {
            u[p]["names"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |n| (p, n))
        })
        .collect();
    // Most frequent first, whatever the protocol.
    names.sort_by_key(|(_, n)| std::cmp::Reverse(n["connections"].as_u64().unwrap_or(0)));
    let mut rows = Vec::new();
    for (p, n) in names.into_iter().take(2 * ROWS) {
        rows.push(vec![
            format!("<code>{}</code>", text(&n["name"])),
            p.into(),
            text(&n["connections"]),
            text(&n["closed"]),
            time(&n["first_seen"], now),
            time(&n["last_seen"], now),
            text(&n["client"]),
        ]);
    }
    table(
        out,
        "unrouted",
        &[
            "name",
            "protocol",
            "#connections",
            "#closed",
            "first seen",
            "last seen",
            "a client",
        ],
        &rows,
        "every name was routed",
    );
    let rows: Vec<Vec<String>> = u["without_name"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(k, n)| vec![escape(k), text(n)])
        .collect();
    out.push_str("<h2>Connections without a name</h2>\n");
    table(
        out,
        "nameless",
        &["why", "#connections"],
        &rows,
        "every connection carried a name",
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes_what_clients_send() {
        assert_eq!(
            escape("<script>\"x\"&'y'</script>"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn dates_and_sizes() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_426), (2025, 12, 4));
        let now = 1_764_849_600.0; // 2025-12-04 12:00:00
        assert_eq!(time(&json!(now + 61.0), now), "12:01:01");
        assert_eq!(time(&json!(now - 86_400.0), now), "2025-12-03 12:00:00");
        assert_eq!(bytes(&json!(812)), "812 B");
        assert_eq!(bytes(&json!(14_200)), "14.2 KB");
    }

    #[test]
    fn renders_every_section_and_escapes() {
        let v = json!({
            "version": "0.1.0",
            "sources": [{"path": "/etc/edge/routes.json", "generation": 3, "routes": 2,
                         "upstreams": 1, "loaded_at": 1.0, "last_error": null}],
            "urls": [{"name": "cluster-a", "state": "watching", "objects": 4, "routes": 3,
                      "last_success": 2.0, "last_error": null}],
            "upstreams": {"web": {"servers": [
                {"address": "10.0.0.1", "state": "up", "active": 1, "total": 9, "fails": 0,
                 "last_check": null},
                {"address": "10.0.0.2", "state": "draining", "active": 2, "total": 5,
                 "fails": 0, "last_check": {"result": "ok", "at": 3.0}}]}},
            "routes": {"tracked": 1, "evicted": 0, "routes": [
                {"route": "shop.test", "match": "exact", "last_seen": 4.0,
                 "tls": {"connections": 7, "active": 1, "bytes_received": 100,
                         "bytes_sent": 2000, "failed": 0, "no_server": 0,
                         "refused": {"rate": 41, "denied": 1}}}]},
            "unrouted": {"tls": {"defaulted": 0, "closed": 2, "names": [
                {"name": "<b>evil</b>.test", "connections": 2, "closed": 2, "first_seen": 1,
                 "last_seen": 2, "client": "192.0.2.1"}]},
                "http": {"defaulted": 0, "closed": 0, "names": []},
                "without_name": {"no_sni": 3, "no_host": 0}},
        });
        let page = render(&v, 10.0);
        for want in [
            "<meta http-equiv=\"refresh\"",
            "<code>/etc/edge/routes.json</code>",
            "cluster-a",
            "<code>10.0.0.2</code>",
            "<table id=\"draining\">",
            "<code>shop.test</code>",
            "2.0 KB",
            "<td class=\"n\">42</td>",
            "&lt;b&gt;evil&lt;/b&gt;.test",
            "<td>no_sni</td><td class=\"n\">3</td>",
        ] {
            assert!(page.contains(want), "{want} in {page}");
        }
        assert!(!page.contains("<b>evil"), "a client's name is escaped");
        assert!(!page.contains("<script"), "no script");
        assert!(!page.contains("no_host"), "kinds never seen are left out");
    }
}
