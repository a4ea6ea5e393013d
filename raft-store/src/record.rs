//! The CommitLog record frame: `len | crc32c | term | index | payload`.
//!
//! All integers are little-endian. `len` is the payload length. The checksum is
//! crc32c over `len`, `term`, `index` and the payload, so a flipped bit in the
//! length field is caught as surely as one in the body. This module only frames
//! bytes; what the payload means is `entry_codec`'s business.

use bytes::BufMut;

/// Bytes before the payload: len (4) + crc (4) + term (8) + index (8).
pub const HEADER_LEN: usize = 24;

/// Largest payload one record may carry. A Raft entry is one message or one batch;
/// anything bigger is a caller bug or hostile input, and refusing it keeps a
/// corrupt length field from making recovery allocate gigabytes.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024 * 1024;

/// A record header as read from disk, before its checksum was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub crc: u32,
    pub term: u64,
    pub index: u64,
}

impl Header {
    pub fn parse(buf: &[u8; HEADER_LEN]) -> Header {
        let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        Header {
            len: u32_at(0),
            crc: u32_at(4),
            term: u64_at(8),
            index: u64_at(16),
        }
    }

    /// Total bytes the record occupies on disk.
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.len)
    }

    /// Whether `payload` is what this header's checksum was computed over.
    pub fn matches(&self, payload: &[u8]) -> bool {
        payload.len() == self.len as usize && checksum(self.len, self.term, self.index, payload) == self.crc
    }
}

fn checksum(len: u32, term: u64, index: u64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 20];
    head[0..4].copy_from_slice(&len.to_le_bytes());
    head[4..12].copy_from_slice(&term.to_le_bytes());
    head[12..20].copy_from_slice(&index.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

/// Appends one framed record to `out`. The caller enforces `MAX_PAYLOAD_LEN`.
pub fn encode_into(out: &mut Vec<u8>, term: u64, index: u64, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_PAYLOAD_LEN);
    let len = payload.len() as u32;
    out.reserve(HEADER_LEN + payload.len());
    out.put_u32_le(len);
    out.put_u32_le(checksum(len, term, index, payload));
    out.put_u64_le(term);
    out.put_u64_le(index);
    out.put_slice(payload);
}

/// Outcome of trying to read one record from the front of `buf`.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole record whose checksum holds.
    Record { header: Header, payload: &'a [u8] },
    /// `buf` ends before the record does (a torn write, or the end of the data).
    Incomplete,
    /// A whole record is present but its checksum or length is wrong.
    Corrupt { header: Header },
}

/// Decodes the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Decoded::Incomplete;
    };
    let header = Header::parse(head);
    if header.len as usize > MAX_PAYLOAD_LEN {
        return Decoded::Corrupt { header };
    }
    let end = HEADER_LEN + header.len as usize;
    if buf.len() < end {
        return Decoded::Incomplete;
    }
    let payload = &buf[HEADER_LEN..end];
    if header.matches(payload) {
        Decoded::Record { header, payload }
    } else {
        Decoded::Corrupt { header }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_then_decode_round_trips(term: u64, index: u64, payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = Vec::new();
            encode_into(&mut buf, term, index, &payload);
            prop_assert_eq!(buf.len(), HEADER_LEN + payload.len());
            match decode(&buf) {
                Decoded::Record { header, payload: got } => {
                    prop_assert_eq!(header.term, term);
                    prop_assert_eq!(header.index, index);
                    prop_assert_eq!(got, &payload[..]);
                }
                other => prop_assert!(false, "expected a record, got {:?}", other),
            }
        }

        #[test]
        fn any_single_bit_flip_is_detected(term: u64, index: u64,
            payload in proptest::collection::vec(any::<u8>(), 1..512), bit in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode_into(&mut buf, term, index, &payload);
            let bit = bit.index(buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            // A flip in the length field may make the record look longer than the
            // buffer (Incomplete) or shorter (Corrupt); it must never decode cleanly.
            let decoded = decode(&buf);
            prop_assert!(!matches!(decoded, Decoded::Record { .. }), "flip at bit {} went unnoticed", bit);
        }

        #[test]
        fn every_strict_prefix_is_incomplete(payload in proptest::collection::vec(any::<u8>(), 0..256), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode_into(&mut buf, 3, 7, &payload);
            let cut = cut.index(buf.len());
            prop_assert_eq!(decode(&buf[..cut]), Decoded::Incomplete);
        }
    }
}
