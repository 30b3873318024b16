//! A small, strict HTTP/1.1 request parser and response writer: exactly
//! what the control API needs and nothing that a peer could stretch.
//!
//! Accepted: `METHOD SP /target SP HTTP/1.1` (or 1.0), CRLF line ends,
//! `name: value` headers in visible ASCII, a body framed by
//! `Content-Length` only. Refused: chunked or any other transfer coding
//! (411), a request line plus headers over [`MAX_HEAD_BYTES`] (431), a body
//! over [`MAX_BODY_BYTES`] (413), other HTTP versions (505), and anything
//! malformed (400). The parser works on a buffer that grows as bytes
//! arrive and refuses a bad request line or header as soon as it is
//! complete, so garbage is answered without waiting for a blank line.

use std::io::{self, Write};

/// Request line and headers, the blank line that ends them included.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
pub const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_METHOD_LEN: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Upper-case ASCII letters.
    pub method: String,
    /// Origin form: starts with `/`, visible ASCII.
    pub target: String,
    pub version: Version,
    /// `None` when the request had no Content-Length (and so no body).
    pub content_length: Option<usize>,
    pub body: Vec<u8>,
    /// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0
    /// closes it unless `Connection: keep-alive`.
    pub keep_alive: bool,
}

#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A request, and how many bytes of the buffer it took.
    Complete(Request, usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("the request line and headers exceed {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("a body of {0} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(u64),
    #[error("transfer codings (chunked) are not supported: send the body with Content-Length")]
    TransferCoding,
    #[error("HTTP version {0} is not supported: use HTTP/1.1")]
    Version(String),
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::TransferCoding => 411,
            HttpError::Version(_) => 505,
        }
    }
}

fn malformed(what: &'static str) -> HttpError {
    HttpError::Malformed(what)
}

/// Parses the request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, HttpError> {
    let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let head_end = window.windows(4).position(|w| w == b"\r\n\r\n");
    // With the blank line found, the head's lines all end in CRLF.
    let head = match head_end {
        Some(end) => &buf[..end + 2],
        None => window,
    };
    let (lines, rest) = split_lines(head)?;
    let mut request = None;
    for line in &lines {
        match &mut request {
            None => {
                let (method, target, version) = request_line(line)?;
                request = Some((method, target, version, HeadInfo::new(version)));
            }
            Some((_, _, _, info)) => info.header(line)?,
        }
    }
    match (head_end, request) {
        (Some(end), Some((method, target, version, info))) => finish(buf, end, method, target, version, info),
        (Some(_), None) => Err(malformed("no request line")),
        (None, request) => {
            // Refuse what is already wrong in the line still arriving.
            match request {
                None => check_request_line_prefix(rest)?,
                Some(_) => check_header_prefix(rest)?,
            }
            if buf.len() >= MAX_HEAD_BYTES {
                return Err(HttpError::HeadTooLarge);
            }
            Ok(Parsed::Incomplete)
        }
    }
}

/// The request whose head ends at `head_end` (where its blank line's CRLF
/// CRLF starts), once its body is in.
fn finish(
    buf: &[u8],
    head_end: usize,
    method: String,
    target: String,
    version: Version,
    head: HeadInfo,
) -> Result<Parsed, HttpError> {
    let body_start = head_end + 4;
    let len = head.content_length.unwrap_or(0);
    let Some(body) = buf.get(body_start..body_start + len) else {
        return Ok(Parsed::Incomplete);
    };
    Ok(Parsed::Complete(
        Request {
            method,
            target,
            version,
            content_length: head.content_length,
            body: body.to_vec(),
            keep_alive: head.keep_alive,
        },
        body_start + len,
    ))
}

/// Splits on CRLF: the complete lines, and what follows the last CRLF.
/// A CR or LF anywhere else is refused.
fn split_lines(head: &[u8]) -> Result<(Vec<&[u8]>, &[u8]), HttpError> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        match head[i] {
            b'\r' => match head.get(i + 1) {
                Some(b'\n') => {
                    lines.push(&head[start..i]);
                    i += 2;
                    start = i;
                }
                Some(_) => return Err(malformed("a CR not followed by LF")),
                // The LF may be on its way.
                None => return Ok((lines, &head[start..i])),
            },
            b'\n' => return Err(malformed("a line ends in LF without CR")),
            _ => i += 1,
        }
    }
    Ok((lines, &head[start..]))
}

/// Visible ASCII, spaces and tabs only.
fn check_chars(s: &[u8]) -> Result<(), HttpError> {
    if s.iter().all(|&b| b == b' ' || b == b'\t' || b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(malformed("a byte that is not visible ASCII"))
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn request_line(line: &[u8]) -> Result<(String, String, Version), HttpError> {
    check_chars(line)?;
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("the request line is not METHOD TARGET VERSION"));
    };
    if method.is_empty() || method.len() > MAX_METHOD_LEN || !method.iter().all(u8::is_ascii_uppercase) {
        return Err(malformed("the method is not a word in capitals"));
    }
    if target.first() != Some(&b'/') || !target.iter().all(u8::is_ascii_graphic) {
        return Err(malformed("the target is not a path starting with /"));
    }
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit() => {
            return Err(HttpError::Version(String::from_utf8_lossy(&version[5..]).into_owned()))
        }
        _ => return Err(malformed("the version is not HTTP/1.1")),
    };
    // Both checked to be ASCII above.
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok((text(method), text(target), version))
}

/// A request line still arriving: text, and a method that is still
/// capitals only.
fn check_request_line_prefix(partial: &[u8]) -> Result<(), HttpError> {
    check_chars(partial)?;
    let method = partial.split(|&b| b == b' ').next().unwrap_or_default();
    if method.len() > MAX_METHOD_LEN || !method.iter().all(u8::is_ascii_uppercase) {
        return Err(malformed("the method is not a word in capitals"));
    }
    Ok(())
}

/// A header line still arriving: its name so far must be a token, and
/// what follows the colon must be text.
fn check_header_prefix(partial: &[u8]) -> Result<(), HttpError> {
    check_chars(partial)?;
    match partial.iter().position(|&b| b == b':') {
        Some(colon) => header_name(&partial[..colon]).map(|_| ()),
        None if partial.iter().all(|&b| is_tchar(b)) => Ok(()),
        None => Err(malformed("a header name that is not a token")),
    }
}

fn header_name(name: &[u8]) -> Result<&[u8], HttpError> {
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(malformed("a header name that is not a token"));
    }
    Ok(name)
}

/// What the headers say that matters here.
struct HeadInfo {
    content_length: Option<usize>,
    keep_alive: bool,
}

impl HeadInfo {
    fn new(version: Version) -> Self {
        HeadInfo {
            content_length: None,
            keep_alive: version == Version::Http11,
        }
    }

    fn header(&mut self, line: &[u8]) -> Result<(), HttpError> {
        check_chars(line)?;
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(malformed("a folded header line"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(malformed("a header line without a colon"))?;
        let name = header_name(&line[..colon])?;
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            if self.content_length.is_some() {
                return Err(malformed("more than one Content-Length"));
            }
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err(malformed("a Content-Length that is not a number"));
            }
            // Digits only, so the only failure is overflow: too large anyway.
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            if n > MAX_BODY_BYTES as u64 {
                return Err(HttpError::BodyTooLarge(n));
            }
            self.content_length = Some(n as usize);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(HttpError::TransferCoding);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if option.eq_ignore_ascii_case(b"close") {
                    self.keep_alive = false;
                } else if option.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                }
            }
        }
        Ok(())
    }
}

/// A response: JSON or nothing. Every response but 204 carries
/// Content-Length (RFC 9110 forbids it on 204).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Vec<u8>>,
    /// For 405: the methods the resource takes.
    pub allow: Option<&'static str>,
    /// The connection ends after this response.
    pub close: bool,
}

impl Response {
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        // Serialising our own plain structs cannot fail; fall back to an
        // empty object rather than panic.
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        Response {
            status,
            body: Some(body),
            allow: None,
            close: false,
        }
    }

    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            allow: None,
            close: false,
        }
    }

    /// An error with a `{"fault_message": ...}` body, as Firecracker sends.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        let fault = bulkhead_vmm_api::control::Fault {
            fault_message: message.into(),
        };
        Self::json(status, &fault)
    }

    /// The answer to a request that could not be parsed; the connection
    /// cannot be trusted to be in step any more, so it ends.
    pub fn from_error(e: &HttpError) -> Self {
        Response {
            close: true,
            ..Self::fault(e.status(), e.to_string())
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: bulkhead-vmm\r\n",
            self.status,
            reason(self.status)
        );
        if let Some(allow) = self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        if self.close {
            out.push_str("Connection: close\r\n");
        }
        match &self.body {
            Some(body) => out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )),
            None if self.status == 204 => out.push_str("\r\n"),
            None => out.push_str("Content-Length: 0\r\n\r\n"),
        }
        let mut bytes = out.into_bytes();
        if let Some(body) = &self.body {
            bytes.extend_from_slice(body);
        }
        bytes
    }

    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.to_bytes())?;
        w.flush()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Ok(Parsed::Complete(r, n)) => (r, n),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn error(buf: &[u8]) -> HttpError {
        match parse(buf) {
            Err(e) => e,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn request_without_body() {
        let buf = b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
        let (r, n) = complete(buf);
        assert_eq!(n, buf.len());
        assert_eq!((r.method.as_str(), r.target.as_str()), ("GET", "/"));
        assert_eq!(r.version, Version::Http11);
        assert_eq!(r.content_length, None);
        assert!(r.body.is_empty());
        assert!(r.keep_alive);
    }

    #[test]
    fn request_with_body_and_no_headers_but_length() {
        let buf = b"PATCH /vm HTTP/1.1\r\ncontent-length: 18\r\n\r\n{\"state\":\"Paused\"}";
        let (r, n) = complete(buf);
        assert_eq!(n, buf.len());
        assert_eq!(r.method, "PATCH");
        assert_eq!(r.content_length, Some(18));
        assert_eq!(r.body, b"{\"state\":\"Paused\"}");
        let (r, _) = complete(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(r.target, "/metrics");
    }

    #[test]
    fn pipelined_pair_is_taken_one_at_a_time() {
        let buf =
            b"PUT /snapshot/create HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        let (first, n) = complete(buf);
        assert_eq!(first.body, b"{}");
        let (second, m) = complete(&buf[n..]);
        assert_eq!(n + m, buf.len());
        assert_eq!(second.target, "/");
        assert!(!second.keep_alive);
    }

    #[test]
    fn every_prefix_of_a_valid_request_is_incomplete() {
        let buf = b"PATCH /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        for i in 0..buf.len() {
            assert!(
                matches!(parse(&buf[..i]), Ok(Parsed::Incomplete)),
                "prefix {i}: {:?}",
                parse(&buf[..i])
            );
        }
        assert_eq!(complete(buf).1, buf.len());
    }

    #[test]
    fn http_1_0_closes_unless_asked_not_to() {
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            complete(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut buf = b"GET / HTTP/1.1\r\n".to_vec();
        while buf.len() < MAX_HEAD_BYTES {
            buf.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(error(&buf), HttpError::HeadTooLarge);
        buf.extend_from_slice(b"\r\n");
        assert_eq!(error(&buf), HttpError::HeadTooLarge);
        assert_eq!(HttpError::HeadTooLarge.status(), 431);
        // Right at the limit is fine.
        let mut ok = b"GET / HTTP/1.1\r\nX: ".to_vec();
        ok.resize(MAX_HEAD_BYTES - 4, b'a');
        ok.extend_from_slice(b"\r\n\r\n");
        assert_eq!(complete(&ok).1, MAX_HEAD_BYTES);
    }

    #[test]
    fn oversized_body_is_refused_before_it_arrives() {
        let e = error(b"PUT /snapshot/create HTTP/1.1\r\nContent-Length: 65537\r\n\r\n");
        assert_eq!(e, HttpError::BodyTooLarge(65537));
        assert_eq!(e.status(), 413);
        let e = error(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n");
        assert_eq!(e.status(), 413);
        let at_limit = format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n");
        assert!(matches!(parse(at_limit.as_bytes()), Ok(Parsed::Incomplete)));
    }

    #[test]
    fn transfer_codings_are_refused() {
        let e =
            error(b"PATCH /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n12\r\n{\"state\":\"Paused\"}\r\n0\r\n\r\n");
        assert_eq!(e, HttpError::TransferCoding);
        assert_eq!(e.status(), 411);
    }

    #[test]
    fn a_body_without_content_length_is_not_taken_as_one() {
        // No Content-Length means no body: the JSON is the next "request",
        // which is refused as such.
        let buf = b"PATCH /vm HTTP/1.1\r\nHost: x\r\n\r\n{\"state\":\"Paused\"}\r\n\r\n";
        let (r, n) = complete(buf);
        assert_eq!(r.content_length, None);
        assert!(r.body.is_empty());
        assert_eq!(error(&buf[n..]).status(), 400);
    }

    #[test]
    fn bad_request_lines_are_refused() {
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 x\r\n\r\n",
            b"get / HTTP/1.1\r\n\r\n",
            b"GET http://host/ HTTP/1.1\r\n\r\n",
            b"GET / HTTX/1.1\r\n\r\n",
            b"\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\n\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
        ] {
            let e = error(bad);
            assert_eq!(e.status(), 400, "{:?}: {e}", String::from_utf8_lossy(bad));
        }
        assert_eq!(error(b"GET / HTTP/2.0\r\n\r\n").status(), 505);
    }

    #[test]
    fn garbage_is_refused_before_a_blank_line_arrives() {
        for garbage in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"hello there\r\n",
            b"hello",
            b"GET / HTTP/1.1\r\n\x00",
            b"GET / HTTP/1.1\r\nX y",
        ] {
            assert_eq!(error(garbage).status(), 400, "{garbage:?}");
        }
    }

    #[test]
    fn responses_carry_content_length() {
        let r = Response::fault(404, "no such thing").to_bytes();
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        let body = r#"{"fault_message":"no such thing"}"#;
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())), "{text}");
        assert!(text.ends_with(&format!("\r\n\r\n{body}")), "{text}");
        let text = String::from_utf8(Response::no_content().to_bytes()).unwrap();
        assert_eq!(text, "HTTP/1.1 204 No Content\r\nServer: bulkhead-vmm\r\n\r\n");
        let closing = Response::from_error(&HttpError::HeadTooLarge);
        assert!(closing.close);
        assert!(String::from_utf8(closing.to_bytes())
            .unwrap()
            .contains("\r\nConnection: close\r\n"));
    }
}
