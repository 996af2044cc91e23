//! Pure readers of the first bytes a client sends. They know nothing of nginx.

pub mod crypto;
pub mod http;
#[cfg(test)]
mod mutate;
mod name;
pub mod quic;
pub mod tls;

pub use name::{Host, ServerName, MAX_LABEL_LEN, MAX_NAME_LEN};

/// The outcome of looking at the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek<T, E> {
    /// Not enough bytes yet: call again with more.
    NeedMore,
    Done(T),
    /// The bytes cannot be what the listener expects.
    Invalid(E),
}

/// The protocol a listener expects, or what `auto` detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tls,
    Http,
}

impl Protocol {
    /// `auto` mode: a TLS handshake record starts with 0x16, nothing in HTTP does.
    pub fn detect(first_byte: u8) -> Protocol {
        if first_byte == 0x16 {
            Protocol::Tls
        } else {
            Protocol::Http
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http => "http",
        }
    }
}
