//! The primitives of every binary encoding (log records, messages,
//! checkpoint sections of every part): little-endian fixed-width integers,
//! LEB128 varints for lengths and small numbers, strings as varint length +
//! UTF-8. Every read checks bounds and validity and fails with
//! [`CodecError`] instead of panicking: bytes from disk are not trusted.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt record: {0}")]
pub struct CodecError(pub &'static str);

type Result<T> = std::result::Result<T, CodecError>;

/// Longest collection a record may hold; anything longer is corrupt.
const MAX_ITEMS: u64 = 1 << 24;

#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    /// A u128 as the same LEB128 varint: a value below 2^64 is the bytes
    /// [`Writer::varint`] writes, so balances logged as u64 read as they are.
    pub fn varint_u128(&mut self, mut v: u128) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    pub fn str(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
}

pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(CodecError("truncated"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(CodecError("varint too long"))
    }
    /// Reads what [`Writer::varint_u128`] (or [`Writer::varint`]) wrote;
    /// bits past 2^128 are corrupt, not dropped.
    pub fn varint_u128(&mut self) -> Result<u128> {
        let mut value = 0u128;
        for shift in (0..128).step_by(7) {
            let byte = self.u8()?;
            let bits = u128::from(byte & 0x7f);
            if shift == 126 && bits > 0b11 {
                return Err(CodecError("varint out of range"));
            }
            value |= bits << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(CodecError("varint too long"))
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        self.take(n)
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    pub fn len(&mut self) -> Result<usize> {
        let n = self.varint()?;
        if n > MAX_ITEMS {
            return Err(CodecError("length out of range"));
        }
        Ok(n as usize)
    }
    /// The length of a byte section that follows: at most what is left
    /// (a section, unlike a collection, may pass [`MAX_ITEMS`] bytes: a
    /// checkpoint's part sections do).
    pub fn byte_len(&mut self) -> Result<usize> {
        let n = self.varint()?;
        if n > self.bytes.len() as u64 {
            return Err(CodecError("section length past the end"));
        }
        Ok(n as usize)
    }
    pub fn str(&mut self) -> Result<&'a str> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| CodecError("invalid utf-8"))
    }
    pub fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(CodecError("invalid bool")),
        }
    }
}
