//! The URL sources' HTTP/1.1 response reader on arbitrary bytes, cut at an arbitrary point:
//! never panics, and a body decoded in two pieces is the body decoded whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ngx_stream_edge_module::feed::http::{parse_head, Body};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let Ok(Some((head, len))) = parse_head(data) else { return };
    assert!(len <= data.len());
    let body = &data[len..];
    let decode = |pieces: &[&[u8]]| {
        let mut b = Body::new(head.framing);
        let mut out = Vec::new();
        for p in pieces {
            b.feed(p, &mut |x| out.extend_from_slice(x))?;
        }
        Ok::<_, String>((out, b.is_done()))
    };
    let at = usize::from(cut).min(body.len());
    let whole = decode(&[body]);
    let split = decode(&[&body[..at], &body[at..]]);
    if let (Ok(w), Ok(s)) = (&whole, &split) {
        assert_eq!(w, s);
        assert!(w.0.len() <= body.len());
    }
});
