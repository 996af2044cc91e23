//! The HTTP request-head reader on arbitrary bytes: never panics; a name it returns is a
//! normalised host name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ngx_stream_edge_module::sniff::{http, Peek};

fuzz_target!(|data: &[u8]| {
    if let Peek::Done(Some(host)) = http::read_host(data) {
        let name = host.to_name();
        let s = name.as_str();
        assert!(!s.is_empty() && s.len() <= 255, "{s:?}");
        assert!(!s.ends_with('.'), "{s:?}");
        assert!(!s.bytes().any(|b| b.is_ascii_uppercase()), "{s:?}");
        // What the preread handler keeps: the same bytes.
        let mut kept = vec![core::mem::MaybeUninit::uninit(); host.len()];
        host.lower_into(&mut kept);
        // SAFETY: `lower_into` wrote every byte.
        let kept: Vec<u8> = kept.iter().map(|b| unsafe { b.assume_init() }).collect();
        assert_eq!(kept, s.as_bytes());
    }
});
