//! Pure: the HTTP/1.1 a route source needs: one GET, a response head, and a body framed by
//! Content-Length, chunked encoding or the close of the connection, decoded as it arrives.

/// Header lines in a response head.
const MAX_HEADERS: usize = 64;
/// Bytes of a response head.
pub const MAX_HEAD: usize = 32 * 1024;
/// Bytes of a chunk-size or trailer line.
const MAX_LINE: usize = 4096;

/// A GET request. `token` goes in `Authorization: Bearer`; `etag` in `If-None-Match`. With
/// `keep_alive`, the connection may carry the next request (the next page of a list).
pub fn request(
    target: &str,
    authority: &str,
    token: Option<&str>,
    etag: Option<&str>,
    keep_alive: bool,
) -> Vec<u8> {
    let mut r = format!(
        "GET {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\n\
         User-Agent: nginx-edge/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(token) = token {
        r.push_str("Authorization: Bearer ");
        r.push_str(token);
        r.push_str("\r\n");
    }
    if let Some(etag) = etag {
        r.push_str("If-None-Match: ");
        r.push_str(etag);
        r.push_str("\r\n");
    }
    if !keep_alive {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// At the close of the connection.
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub etag: Option<String>,
    pub framing: Framing,
    /// The server closes the connection after this answer (`Connection: close`, HTTP/1.0).
    pub close: bool,
}

/// Parses a response head from the start of `buf`: the head and its length, or `None` if more
/// bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(format!(
                "a response head larger than {} kB",
                MAX_HEAD / 1024
            ))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("a broken response head ({e})")),
    };
    let status = response.code.unwrap_or(0);
    let mut etag = None;
    let mut length = None;
    let mut chunked = false;
    let mut close = response.version != Some(1);
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            close |= v.split(',').any(|t| t.trim() == "close");
        }
        if h.name.eq_ignore_ascii_case("etag") {
            etag = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| v.len() <= 256 && v.bytes().all(|b| (b' '..0x7f).contains(&b)))
                .map(str::to_owned);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("an invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Lengths".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.trim() != "chunked" {
                return Err(format!("an unsupported Transfer-Encoding \"{}\"", v.trim()));
            }
            chunked = true;
        }
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        // 204 and 304 have no body.
        (false, None) if status == 204 || status == 304 => Framing::Length(0),
        (false, None) => Framing::Close,
    };
    Ok(Some((
        Head {
            status,
            etag,
            framing,
            close,
        },
        len,
    )))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Raw bytes left (Content-Length), or until the close.
    Raw(u64),
    UntilClose,
    /// Reading a chunk-size line.
    Size,
    /// Bytes left of a chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk, up to an empty one.
    Trailer,
    Done,
}

/// Decodes a body as it arrives.
#[derive(Debug)]
pub struct Body {
    state: State,
    line: Vec<u8>,
}

impl Body {
    pub fn new(framing: Framing) -> Body {
        Body {
            state: match framing {
                Framing::Length(0) => State::Done,
                Framing::Length(n) => State::Raw(n),
                Framing::Chunked => State::Size,
                Framing::Close => State::UntilClose,
            },
            line: Vec::new(),
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The connection closed: whether that ends the body well.
    pub fn closed(&mut self) -> bool {
        if self.state == State::UntilClose {
            self.state = State::Done;
        }
        self.is_done()
    }

    /// Decodes `input`, handing each piece of the body to `out`. Bytes after the end of the
    /// body are an error (no request is sent before the answer to the last one ended).
    pub fn feed(&mut self, mut input: &[u8], out: &mut dyn FnMut(&[u8])) -> Result<(), String> {
        while !input.is_empty() {
            match self.state {
                State::Done => return Err("bytes after the end of the body".into()),
                State::UntilClose => {
                    out(input);
                    return Ok(());
                }
                State::Raw(left) => {
                    let n = (input.len() as u64).min(left) as usize;
                    out(&input[..n]);
                    input = &input[n..];
                    self.state = if left == n as u64 {
                        State::Done
                    } else {
                        State::Raw(left - n as u64)
                    };
                }
                State::Data(left) => {
                    let n = (input.len() as u64).min(left) as usize;
                    out(&input[..n]);
                    input = &input[n..];
                    self.state = if left == n as u64 {
                        State::DataEnd
                    } else {
                        State::Data(left - n as u64)
                    };
                }
                State::DataEnd if self.line.is_empty() && !matches!(input[0], b'\r' | b'\n') => {
                    return Err("no CRLF after a chunk".into());
                }
                State::Size | State::DataEnd | State::Trailer => {
                    let Some(line) = self.line(&mut input)? else {
                        return Ok(());
                    };
                    self.state = match self.state {
                        State::DataEnd if line.is_empty() => State::Size,
                        State::DataEnd => return Err("no CRLF after a chunk".into()),
                        State::Trailer if line.is_empty() => State::Done,
                        State::Trailer => State::Trailer,
                        _ => match chunk_size(&line)? {
                            0 => State::Trailer,
                            n => State::Data(n),
                        },
                    };
                }
            }
        }
        Ok(())
    }

    /// Takes a CRLF-terminated line from `input`, buffering a partial one.
    fn line(&mut self, input: &mut &[u8]) -> Result<Option<Vec<u8>>, String> {
        match input.iter().position(|&b| b == b'\n') {
            Some(at) => {
                self.line.extend_from_slice(&input[..at]);
                *input = &input[at + 1..];
                if self.line.len() > MAX_LINE {
                    return Err("a chunk line too long".into());
                }
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Ok(Some(line))
            }
            None => {
                self.line.extend_from_slice(input);
                *input = &[];
                if self.line.len() > MAX_LINE {
                    return Err("a chunk line too long".into());
                }
                Ok(None)
            }
        }
    }
}

fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let hex = line.split(|&b| b == b';').next().unwrap_or(b"");
    let hex = std::str::from_utf8(hex).unwrap_or("").trim();
    if hex.is_empty() || hex.len() > 15 {
        return Err("an invalid chunk size".into());
    }
    u64::from_str_radix(hex, 16).map_err(|_| "an invalid chunk size".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(framing: Framing, pieces: &[&[u8]]) -> Result<(Vec<u8>, bool), String> {
        let mut body = Body::new(framing);
        let mut out = Vec::new();
        for p in pieces {
            body.feed(p, &mut |b| out.extend_from_slice(b))?;
        }
        Ok((out, body.is_done()))
    }

    #[test]
    fn heads_give_status_framing_and_etag() {
        let (h, len) = parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"abc\"\r\nTransfer-Encoding: chunked\r\n\r\nrest",
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.status, h.framing), (200, Framing::Chunked));
        assert_eq!(h.etag.as_deref(), Some("\"abc\""));
        assert_eq!(len, 92);
        assert!(
            !h.close,
            "HTTP/1.1 keeps the connection unless it says otherwise"
        );
        let (h, _) = parse_head(b"HTTP/1.1 304 Not Modified\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        let (h, _) = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, Framing::Close);
        assert!(h.close, "HTTP/1.0 closes");
        for close in ["close", "Close", "keep-alive, close"] {
            let head =
                format!("HTTP/1.1 200 OK\r\nConnection: {close}\r\nContent-Length: 0\r\n\r\n");
            assert!(
                parse_head(head.as_bytes()).unwrap().unwrap().0.close,
                "{close}"
            );
        }
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-"), Ok(None));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .is_err()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        assert!(parse_head(&long).is_err());
    }

    #[test]
    fn bodies_decode_whatever_the_pieces() {
        let chunked = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for split in 0..chunked.len() {
            let (a, b) = chunked.split_at(split);
            assert_eq!(
                decode(Framing::Chunked, &[a, b]).unwrap(),
                (b"hello, world".to_vec(), true),
                "split at {split}"
            );
        }
        let bytes: Vec<&[u8]> = chunked.chunks(1).collect();
        assert_eq!(
            decode(Framing::Chunked, &bytes).unwrap(),
            (b"hello, world".to_vec(), true)
        );
        assert_eq!(
            decode(Framing::Length(5), &[b"he", b"llo"]).unwrap(),
            (b"hello".to_vec(), true)
        );
        assert_eq!(
            decode(Framing::Length(5), &[b"he"]).unwrap(),
            (b"he".to_vec(), false)
        );
        let mut close = Body::new(Framing::Close);
        close.feed(b"abc", &mut |_| {}).unwrap();
        assert!(!close.is_done());
        assert!(close.closed());
        assert!(decode(Framing::Length(2), &[b"abc"]).is_err());
        assert!(decode(Framing::Chunked, &[b"zz\r\n"]).is_err());
        assert!(decode(Framing::Chunked, &[b"3\r\nabcX"]).is_err());
        assert!(decode(Framing::Chunked, &[b"fffffffffffffffff\r\n"]).is_err());
        assert!(decode(Framing::Chunked, &[&[b'1'; 5000][..]]).is_err());
        let mut partial = Body::new(Framing::Chunked);
        partial.feed(b"3\r\nab", &mut |_| {}).unwrap();
        assert!(!partial.closed(), "a chunked body cut short is an error");
    }

    #[test]
    fn requests_carry_token_and_etag_only_when_given() {
        let r = String::from_utf8(request(
            "/a?b=1",
            "h:6443",
            Some("t0k"),
            Some("\"e\""),
            false,
        ))
        .unwrap();
        assert!(r.starts_with("GET /a?b=1 HTTP/1.1\r\nHost: h:6443\r\n"));
        assert!(r.contains("Authorization: Bearer t0k\r\n"));
        assert!(r.contains("If-None-Match: \"e\"\r\n"));
        assert!(r.ends_with("Connection: close\r\n\r\n"));
        let r = String::from_utf8(request("/", "h", None, None, true)).unwrap();
        assert!(!r.contains("Authorization") && !r.contains("If-None-Match"));
        assert!(
            !r.contains("Connection") && r.ends_with("\r\n\r\n"),
            "kept alive"
        );
    }
}
