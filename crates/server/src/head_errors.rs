//! Problem+json for the answers hyper makes itself.
//!
//! A request head hyper cannot parse (a malformed request line or header,
//! a head over the size or field bound, a target too long) never reaches
//! the router: hyper writes a bare status with an empty body and closes the
//! connection, and its builder has no hook to change that answer. So the
//! connection's byte stream is wrapped: a write that is such an automatic
//! answer (its status line, and no `x-request-id`, which every answer of
//! the router carries) is replaced by the same status with a problem+json
//! body. Every other write passes unchanged, after a prefix comparison.
//!
//! The read side follows the request stream ([`Framing`]) and makes hyper
//! refuse a head with both `Content-Length` and `Transfer-Encoding`.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::http::StatusCode;
use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{problem_body, ApiError, PROBLEM_JSON};
use crate::framing::Framing;

/// The status lines of hyper's automatic answers (`on_error` in hyper's
/// `proto::h1::role`), always HTTP/1.1.
const AUTOMATIC: [(&[u8], StatusCode); 3] = [
    (b"HTTP/1.1 400 Bad Request\r\n", StatusCode::BAD_REQUEST),
    (b"HTTP/1.1 431 Request Header Fields Too Large\r\n", StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
    (b"HTTP/1.1 414 URI Too Long\r\n", StatusCode::URI_TOO_LONG),
];
const HEAD_END: &[u8] = b"\r\n\r\n";
const REQUEST_ID_LINE: &[u8] = b"\r\nx-request-id:";

/// The bounds a 431 names.
#[derive(Clone, Copy, Debug)]
pub struct HeadBounds {
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

/// A stream whose automatic error answers from hyper become problem+json.
pub struct HeadErrors<IO> {
    io: IO,
    bounds: HeadBounds,
    framing: Framing,
    /// The replacement answer, still to be written.
    pending: Bytes,
}

impl<IO> HeadErrors<IO> {
    pub fn new(io: IO, bounds: HeadBounds) -> HeadErrors<IO> {
        HeadErrors { io, bounds, framing: Framing::new(bounds.max_header_bytes), pending: Bytes::new() }
    }
}

/// The error an automatic answer with `status` stands for.
fn error_for(status: StatusCode, bounds: HeadBounds, smuggling: bool) -> ApiError {
    match status {
        StatusCode::BAD_REQUEST if smuggling => ApiError::invalid(
            "the request has both Content-Length and Transfer-Encoding, which can smuggle a request past a proxy; \
             refused, and the connection is closed",
        ),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeadTooLarge(format!(
            "the request head is larger than {} bytes or has more than {} header fields",
            bounds.max_header_bytes, bounds.max_headers
        )),
        StatusCode::URI_TOO_LONG => ApiError::UriTooLong("the request target is too long".to_owned()),
        _ => ApiError::invalid(
            "the request head is malformed: not an HTTP/1.1 request line and header fields (RFC 9112)",
        ),
    }
}

/// If `buf` starts with an automatic answer's head: its length and the
/// answer to write instead.
fn replacement(buf: &[u8], bounds: HeadBounds, smuggling: bool) -> Option<(usize, Bytes)> {
    let &(line, status) = AUTOMATIC.iter().find(|(line, _)| buf.starts_with(line))?;
    let head_len = buf.windows(HEAD_END.len()).position(|w| w == HEAD_END)? + HEAD_END.len();
    let head = &buf[..head_len];
    if head.windows(REQUEST_ID_LINE.len()).any(|w| w.eq_ignore_ascii_case(REQUEST_ID_LINE)) {
        return None;
    }
    let error = error_for(status, bounds, smuggling);
    let body = problem_body(status, error.code(), error.to_string());
    let request_id = crate::observe::generate_request_id();
    let mut answer = Vec::with_capacity(256 + body.len());
    answer.extend_from_slice(&line[..line.len() - 2]);
    answer.extend_from_slice(b"\r\ncontent-type: ");
    answer.extend_from_slice(PROBLEM_JSON.as_bytes());
    answer.extend_from_slice(b"\r\ncontent-length: ");
    answer.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    answer.extend_from_slice(b"\r\nconnection: close\r\nx-request-id: ");
    answer.extend_from_slice(request_id.as_bytes());
    answer.extend_from_slice(HEAD_END);
    answer.extend_from_slice(&body);
    crate::observe::count_unparsed_request(status.as_u16());
    Some((head_len, Bytes::from(answer)))
}

impl<IO: AsyncWrite + Unpin> HeadErrors<IO> {
    /// Writes what is left of a replacement answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(written);
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `buf`'s head in place of an automatic answer, if it is one:
    /// the replacement is written now as far as the socket takes it, the
    /// rest before anything else (flush and shutdown included).
    fn intercept(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<io::Result<usize>> {
        let (consumed, answer) = replacement(buf, self.bounds, self.framing.refused())?;
        self.pending = answer;
        match self.poll_pending(cx) {
            Poll::Ready(Err(error)) => Some(Err(error)),
            _ => Some(Ok(consumed)),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for HeadErrors<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.framing.read(&mut buf.filled_mut()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadErrors<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(result) = self.intercept(cx, buf) {
            return Poll::Ready(result);
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if let Some(result) = self.intercept(cx, first) {
                return Poll::Ready(result);
            }
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: HeadBounds = HeadBounds { max_header_bytes: 100, max_headers: 5 };

    #[test]
    fn only_automatic_answers_are_replaced() {
        let automatic = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let (consumed, answer) = replacement(automatic, BOUNDS, false).expect("replaced");
        assert_eq!(consumed, automatic.len());
        let text = String::from_utf8(answer.to_vec()).unwrap();
        assert!(text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{text}");
        assert!(text.contains("content-type: application/problem+json\r\n"), "{text}");
        assert!(text.contains("\"code\":\"request_header_fields_too_large\""), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{text}");

        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\nx-request-id: a\r\n\r\n{}";
        assert!(replacement(ours, BOUNDS, false).is_none());
        assert!(replacement(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", BOUNDS, false).is_none());
        assert!(replacement(b"HTTP/1.1 400 Bad Request\r\ncontent-le", BOUNDS, false).is_none(), "a partial head");
    }
}
