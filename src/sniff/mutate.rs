//! Deterministic mutation testing of the readers: a stable-toolchain stand-in for a fuzzer
//! that runs with every `cargo test`. Each input is checked for panics and for the contract
//! that a prefix of a complete input never reads as something else than "need more" or the
//! same verdict.

use super::{http, tls, Peek};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(4) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            2 if !data.is_empty() => {
                let at = rng.below(data.len());
                data.truncate(at.max(1));
            }
            _ => {
                let i = rng.below(data.len() + 1);
                data.insert(i, rng.next() as u8);
            }
        }
    }
    data
}

#[test]
fn client_hello_reader_survives_mutations() {
    let seeds = [
        tls::tests::records(
            &tls::tests::hello_message(Some("a.example.com"), &["h2", "http/1.1"], 0),
            16384,
        ),
        tls::tests::records(
            &tls::tests::hello_message(Some("b.test"), &["acme-tls/1"], 300),
            64,
        ),
        tls::tests::records(&tls::tests::hello_message(None, &[], 0), 16384),
    ];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut scratch = Vec::new();
    for round in 0..60_000 {
        let input = mutate(&mut rng, &seeds[round % seeds.len()]);
        let verdict = tls::read_client_hello(&input, &mut scratch).map_done();
        // Whatever a complete input says, its prefixes say it too or ask for more.
        let cut = rng.below(input.len() + 1);
        let prefix = tls::read_client_hello(&input[..cut], &mut scratch).map_done();
        assert!(
            prefix == Peek::NeedMore || prefix == verdict || matches!(prefix, Peek::Invalid(_)),
            "{input:?}"
        );
    }
}

#[test]
fn http_head_reader_survives_mutations() {
    let seeds: [&[u8]; 3] = [
        b"GET /.well-known/acme-challenge/x HTTP/1.1\r\nHost: a.example.com:80\r\nAccept: */*\r\n\r\n",
        b"GET http://u@b.test/ HTTP/1.1\r\nHost: other\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ];
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for round in 0..60_000 {
        let input = mutate(&mut rng, seeds[round % seeds.len()]);
        let _ = http::read_host(&input);
    }
}

impl<'a> Peek<tls::ClientHello<'a>, tls::Reject> {
    /// The verdict without borrowed parts, to compare two reads.
    fn map_done(self) -> Peek<Option<String>, tls::Reject> {
        match self {
            Peek::NeedMore => Peek::NeedMore,
            Peek::Done(h) => Peek::Done(h.server_name.map(|n| n.to_name().as_str().to_owned())),
            Peek::Invalid(r) => Peek::Invalid(r),
        }
    }
}
