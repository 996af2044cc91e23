//! The ClientHello reader on arbitrary bytes: never panics, and agrees with itself when the
//! same bytes come in two reads (a prefix first).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ngx_stream_edge_module::sniff::{tls, Peek};

fuzz_target!(|data: &[u8]| {
    let mut scratch = Vec::new();
    let whole = tls::read_client_hello(data, &mut scratch);
    if let Peek::Done(hello) = &whole {
        if let Some(host) = &hello.server_name {
            let name = host.to_name();
            assert!(name.as_str().len() <= 255);
            assert!(!name.as_str().bytes().any(|b| b.is_ascii_uppercase()));
            // What the preread handler keeps: the same bytes as the name.
            let mut kept = vec![core::mem::MaybeUninit::uninit(); host.len()];
            host.lower_into(&mut kept);
            // SAFETY: `lower_into` wrote every byte.
            let kept: Vec<u8> = kept.iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(kept, name.as_str().as_bytes());
        }
        if let Some(list) = hello.alpn {
            let names: Vec<&[u8]> = tls::alpn_protocols(list).collect();
            assert!(names.iter().all(|proto| !proto.is_empty()));
            // What `$edge_alpn` shows: the list joined in place, as the names with commas.
            let mut joined = list.to_vec();
            let n = tls::join_alpn_in_place(&mut joined);
            assert_eq!(&joined[..n], &names.join(&b","[..])[..]);
        }
    }
    // A prefix of a complete hello never reads as a different hello.
    if data.len() > 1 {
        let mut scratch = Vec::new();
        if let Peek::Done(prefix) = tls::read_client_hello(&data[..data.len() / 2], &mut scratch) {
            if let Peek::Done(full) = &whole {
                assert_eq!(
                    prefix.server_name.as_ref().map(|n| n.to_name().as_str().to_owned()),
                    full.server_name.as_ref().map(|n| n.to_name().as_str().to_owned())
                );
            }
        }
    }
});
