//! The QUIC Initial reader on arbitrary datagrams, and on arbitrary frames sealed into real
//! Initial packets (so that the opened path is reached): never panics, keeps what it is bounded
//! to, and reads the same hello whatever the order its pieces come in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ngx_stream_edge_module::sniff::quic::{self, Initials, VERSION_1, VERSION_2};
use ngx_stream_edge_module::sniff::Peek;

const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

/// The hello's server name, or what stopped the reader.
fn outcome(initials: &Initials) -> Option<String> {
    match initials.client_hello() {
        Peek::Done(h) => Some(h.server_name.map_or_else(String::new, |n| n.to_name().as_str().to_owned())),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Raw datagrams, each prefixed by its length (one byte, times 8).
        let mut initials = Initials::new();
        let mut rest = rest;
        while let Some((&len, tail)) = rest.split_first() {
            let len = (usize::from(len) * 8).min(tail.len());
            let _ = initials.push(&tail[..len]);
            let _ = initials.client_hello();
            rest = &tail[len..];
        }
        return;
    }
    // The bytes are the frames of Initial packets, split in two at a point the input picks,
    // each sealed with the keys of one connection ID; pushed in both orders.
    let v = if mode & 2 == 0 { VERSION_1 } else { VERSION_2 };
    let cut = usize::from(mode >> 2) * rest.len() / 64;
    let (a, b) = rest.split_at(cut.min(rest.len()));
    let first = quic::client_initial(v, &DCID, &[7], 0, 2, a, 1200);
    let second = quic::client_initial(v, &DCID, &[7], 1, 2, b, 1200);
    let mut forward = Initials::new();
    let f1 = forward.push(&first);
    let f2 = forward.push(&second);
    let mut backward = Initials::new();
    let b1 = backward.push(&second);
    let b2 = backward.push(&first);
    // Frames that both packets accept read as the same hello in either order.
    if !matches!(f1, Peek::Invalid(_))
        && !matches!(f2, Peek::Invalid(_))
        && !matches!(b1, Peek::Invalid(_))
        && !matches!(b2, Peek::Invalid(_))
    {
        assert_eq!(outcome(&forward), outcome(&backward));
    }
});
