//! Non-blocking reads and writes on an nginx connection, for the module's own connections
//! (status answers, check probes): what nginx's `recv`/`send` return, as values, with the
//! event re-armed when the socket would block.

use nginx_sys::{
    ngx_connection_t, ngx_handle_read_event, ngx_handle_write_event, NGX_AGAIN, NGX_OK,
};

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
