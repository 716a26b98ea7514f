//! Follows the HTTP/1.1 request stream of a connection as it is read, to
//! find request heads that carry both `Content-Length` and
//! `Transfer-Encoding`.
//!
//! hyper serves such a request by its `Transfer-Encoding` alone (RFC 9112
//! §6.3 allows that) and drops the `Content-Length` before the router could
//! see it. Behind a proxy that frames by `Content-Length` that is request
//! smuggling, so the request is refused instead: the byte that ends its head
//! is overwritten before hyper parses the head, which makes hyper fail it
//! as malformed (and close the connection), and the answer says why.
//!
//! Only heads and chunk-size lines are scanned; body bytes are skipped by
//! count. A stream this cannot follow (a head over the bound, a length that
//! does not parse) is left alone: hyper refuses it anyway.

/// The byte written over the last byte of a refused head: after `\r`
/// anything but `\n` fails the head at once.
const POISON: u8 = 0;

#[derive(Debug)]
enum State {
    /// Gathering a request head (after any empty lines before it).
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// In a chunk-size line (its digits so far), or its extension.
    ChunkSize {
        size: u64,
        in_extension: bool,
    },
    /// Skipping a chunk's data, then its CRLF.
    ChunkData(u64),
    ChunkDataEnd,
    /// In the trailer section: bytes on the current line, `\r` not counted.
    Trailer {
        line_len: usize,
    },
    /// Not followed any more.
    Lost,
}

#[derive(Debug)]
pub struct Framing {
    state: State,
    head: Vec<u8>,
    max_head_bytes: usize,
    /// A refused head was seen (and poisoned) on this connection.
    refused: bool,
}

impl Framing {
    pub fn new(max_head_bytes: usize) -> Framing {
        Framing { state: State::Head, head: Vec::new(), max_head_bytes, refused: false }
    }

    /// Whether a head with both framings was refused on this connection.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// Follows `bytes`, just read from the client; poisons the last byte of
    /// a head that must be refused.
    pub fn read(&mut self, bytes: &mut [u8]) {
        let mut at = 0;
        while at < bytes.len() {
            at += match &mut self.state {
                State::Lost => return,
                State::Head => self.head_bytes(&mut bytes[at..]),
                State::Body(left) => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(bytes.len() - at);
                    *left -= take as u64;
                    if *left == 0 {
                        self.state = State::Head;
                    }
                    take
                }
                State::ChunkData(left) => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(bytes.len() - at);
                    *left -= take as u64;
                    if *left == 0 {
                        self.state = State::ChunkDataEnd;
                    }
                    take
                }
                _ => {
                    self.chunk_byte(bytes[at]);
                    1
                }
            };
        }
    }

    /// Takes head bytes up to the head's end; returns how many it took. A
    /// head that arrives in one read (the usual case) is parsed where it
    /// lies; one split across reads is gathered first.
    fn head_bytes(&mut self, bytes: &mut [u8]) -> usize {
        let mut start = 0;
        if self.head.is_empty() {
            // Empty lines before a request line are allowed (RFC 9112 §2.2).
            start = bytes.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
        }
        let Some(end) = self.head_end(&bytes[start..]).map(|end| start + end) else {
            self.head.extend_from_slice(&bytes[start..]);
            if self.head.len() > self.max_head_bytes {
                self.state = State::Lost;
            }
            return bytes.len();
        };
        let refuse = if self.head.is_empty() {
            self.end_of_head(&bytes[start..=end])
        } else {
            let mut head = std::mem::take(&mut self.head);
            head.extend_from_slice(&bytes[start..=end]);
            let refuse = self.end_of_head(&head);
            head.clear();
            self.head = head;
            refuse
        };
        if refuse {
            bytes[end] = POISON;
        }
        end + 1
    }

    /// The index in `bytes` of the `\n` that ends the head begun in
    /// `self.head` (an empty line: `\n\n` or `\n\r\n`).
    fn head_end(&self, bytes: &[u8]) -> Option<usize> {
        let before = |index: usize, back: usize| -> Option<u8> {
            match index.checked_sub(back) {
                Some(at) => Some(bytes[at]),
                None => self.head.len().checked_sub(back - index).map(|at| self.head[at]),
            }
        };
        let mut from = 0;
        while let Some(found) = bytes[from..].iter().position(|&b| b == b'\n') {
            let index = from + found;
            match before(index, 1) {
                Some(b'\n') => return Some(index),
                Some(b'\r') if before(index, 2) == Some(b'\n') => return Some(index),
                _ => from = index + 1,
            }
        }
        None
    }

    /// A whole head: the next state; true if the head must be refused.
    fn end_of_head(&mut self, head: &[u8]) -> bool {
        match body_framing(head) {
            Some(BodyFraming { length: Some(_), chunked: true }) => {
                self.refused = true;
                self.state = State::Lost;
                return true;
            }
            Some(BodyFraming { chunked: true, .. }) => {
                self.state = State::ChunkSize { size: 0, in_extension: false };
            }
            Some(BodyFraming { length: Some(length), .. }) if length > 0 => self.state = State::Body(length),
            Some(_) => self.state = State::Head,
            None => self.state = State::Lost,
        }
        false
    }

    fn chunk_byte(&mut self, byte: u8) {
        self.state = match self.state {
            State::ChunkSize { size, in_extension: false } if byte.is_ascii_hexdigit() => {
                let digit = u64::from((byte as char).to_digit(16).unwrap_or(0));
                match size.checked_mul(16).and_then(|s| s.checked_add(digit)) {
                    Some(size) => State::ChunkSize { size, in_extension: false },
                    None => State::Lost,
                }
            }
            State::ChunkSize { size: 0, .. } if byte == b'\n' => State::Trailer { line_len: 0 },
            State::ChunkSize { size, .. } if byte == b'\n' => State::ChunkData(size),
            State::ChunkSize { size, .. } => State::ChunkSize { size, in_extension: true },
            State::ChunkDataEnd if byte == b'\n' => State::ChunkSize { size: 0, in_extension: false },
            State::ChunkDataEnd => State::ChunkDataEnd,
            State::Trailer { line_len: 0 } if byte == b'\n' => State::Head,
            State::Trailer { .. } if byte == b'\n' => State::Trailer { line_len: 0 },
            State::Trailer { line_len } if byte == b'\r' => State::Trailer { line_len },
            State::Trailer { line_len } => State::Trailer { line_len: line_len + 1 },
            _ => State::Lost,
        };
    }
}

struct BodyFraming {
    length: Option<u64>,
    chunked: bool,
}

/// How a head frames its body; `None` if it cannot tell (hyper will
/// refuse such a head itself).
fn body_framing(head: &[u8]) -> Option<BodyFraming> {
    let mut framing = BodyFraming { length: None, chunked: false };
    let mut transfer_encoding = false;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], std::str::from_utf8(&line[colon + 1..]).ok()?.trim());
        if name.eq_ignore_ascii_case(b"content-length") {
            framing.length = Some(value.parse().ok()?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            framing.chunked = value.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    if transfer_encoding && !framing.chunked {
        return None;
    }
    Some(framing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` in pieces of `step` bytes; returns what hyper would
    /// read and whether a head was refused.
    fn follow(stream: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut framing = Framing::new(1024);
        let mut seen = stream.to_vec();
        for piece in seen.chunks_mut(step) {
            framing.read(piece);
        }
        (seen, framing.refused())
    }

    #[test]
    fn both_framings_are_poisoned_anywhere_in_a_keep_alive_stream() {
        let smuggled = b"POST /a HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let fine_chunked = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n";
        // A body that looks like a smuggling head is only body.
        let fine_length = b"POST /a HTTP/1.1\r\ncontent-length: 65\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let get = b"\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n";
        for step in [1, 3, 7, 1000] {
            let mut stream = [&fine_chunked[..], fine_length, get].concat();
            let (seen, refused) = follow(&stream, step);
            assert_eq!((seen.as_slice(), refused), (stream.as_slice(), false), "step {step}");

            stream.extend_from_slice(smuggled);
            let (seen, refused) = follow(&stream, step);
            assert!(refused, "step {step}");
            let head_end = stream.len() - b"0\r\n\r\n".len() - 1;
            assert_eq!(seen[head_end], POISON, "step {step}");
            assert_eq!(seen[..head_end], stream[..head_end], "step {step}");
        }
        let reversed = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n";
        assert!(follow(reversed, 5).1);
    }
}
