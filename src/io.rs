//! Non-blocking reads and writes on an nginx connection, for the module's own connections
//! (status answers, check probes): what nginx's `recv`/`send` return, as values, with the
//! event re-armed when the socket would block.

use std::net::SocketAddr;

use nginx_sys::{
    ngx_connection_t, ngx_handle_read_event, ngx_handle_write_event, sockaddr, sockaddr_in,
    sockaddr_in6, socklen_t, NGX_AGAIN, NGX_OK,
};

/// Writes `addr` as a `sockaddr_in` or `sockaddr_in6` at `out`, which must have room for a
/// zeroed `sockaddr_in6`; returns its length.
pub unsafe fn write_sockaddr(out: *mut sockaddr, addr: SocketAddr) -> socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = &mut *out.cast::<sockaddr_in>();
            sin.sin_family = libc::AF_INET as _;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            core::mem::size_of::<sockaddr_in>() as socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = &mut *out.cast::<sockaddr_in6>();
            sin6.sin6_family = libc::AF_INET6 as _;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.__in6_u.__u6_addr8 = a.ip().octets();
            core::mem::size_of::<sockaddr_in6>() as socklen_t
        }
    }
}

pub enum Sent {
    /// Everything is out.
    All,
    /// The socket is full: the write event is armed; call again when it fires.
    Again,
    /// The peer closed or reset, or the event could not be armed.
    Failed,
}

/// Sends `data[*sent..]`, advancing `sent`.
pub unsafe fn send_rest(c: *mut ngx_connection_t, data: &[u8], sent: &mut usize) -> Sent {
    while *sent < data.len() {
        let rest = &data[*sent..];
        let n = ((*c).send.unwrap())(c, rest.as_ptr().cast_mut(), rest.len());
        if n == NGX_AGAIN as isize {
            return if ngx_handle_write_event((*c).write, 0) == NGX_OK as isize {
                Sent::Again
            } else {
                Sent::Failed
            };
        }
        if n <= 0 {
            return Sent::Failed;
        }
        *sent += n as usize;
    }
    Sent::All
}

pub enum Received {
    Bytes(usize),
    /// Nothing to read: the read event is armed.
    Again,
    /// The peer closed, or an error (including failing to arm the event).
    Closed,
}

/// Reads what is there into `buf` (which must not be empty).
pub unsafe fn recv(c: *mut ngx_connection_t, buf: &mut [u8]) -> Received {
    let n = ((*c).recv.unwrap())(c, buf.as_mut_ptr(), buf.len());
    if n == NGX_AGAIN as isize {
        return if ngx_handle_read_event((*c).read, 0) == NGX_OK as isize {
            Received::Again
        } else {
            Received::Closed
        };
    }
    if n <= 0 {
        return Received::Closed;
    }
    Received::Bytes(n as usize)
}
