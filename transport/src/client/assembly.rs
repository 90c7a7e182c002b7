//! The bytes of one object as they arrive, checked against the manifest's
//! hashes segment by segment.

use crate::Error;
use crate::manifest::{Digest, MAX_COMPONENT_BYTES};

/// The hashes that the bytes of one fetched object must match.
pub(super) struct Verification {
    /// `(end offset, digest)` of consecutive segments covering the object.
    pub(super) segments: Vec<(u64, Digest)>,
    pub(super) whole: Option<Digest>,
}

/// Bytes of one object as they arrive, checked segment by segment.
pub(super) struct Assembly<'v> {
    pub(super) object: String,
    /// Offset in the object of `data[0]`.
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) data: Vec<u8>,
    pub(super) verification: Option<&'v Verification>,
    pub(super) next_segment: usize,
    /// Offset up to which every segment matched its hash.
    pub(super) verified: u64,
    pub(super) whole: blake3::Hasher,
}

impl<'v> Assembly<'v> {
    /// Reserves room for `start..end` up front, once its length is known to
    /// be within [`MAX_COMPONENT_BYTES`], and as an error rather than an
    /// abort when the memory is not there.
    pub(super) fn new(
        object: String,
        start: u64,
        end: u64,
        verification: Option<&'v Verification>,
    ) -> Result<Self, Error> {
        let Some(len) = end.checked_sub(start) else {
            return Err(Error::InvertedRange { object, start, end });
        };
        if len > MAX_COMPONENT_BYTES {
            return Err(Error::ObjectTooLarge {
                object,
                len,
                max: MAX_COMPONENT_BYTES,
            });
        }
        let mut data = Vec::new();
        let reserved = usize::try_from(len)
            .ok()
            .and_then(|len| data.try_reserve_exact(len).ok());
        if reserved.is_none() {
            return Err(Error::OutOfMemory { object, len });
        }
        Ok(Assembly {
            object,
            start,
            end,
            data,
            verification,
            next_segment: 0,
            verified: start,
            whole: blake3::Hasher::new(),
        })
    }

    pub(super) fn next_offset(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    pub(super) fn push(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if self.next_offset() + bytes.len() as u64 > self.end {
            return Err(Error::LengthMismatch {
                object: self.object.clone(),
                announced: self.next_offset() + bytes.len() as u64 - self.start,
                expected: self.end - self.start,
            });
        }
        self.data.extend_from_slice(bytes);
        self.verify_complete_segments()
    }

    fn verify_complete_segments(&mut self) -> Result<(), Error> {
        let Some(verification) = self.verification else {
            return Ok(());
        };
        while let Some(&(segment_end, digest)) = verification.segments.get(self.next_segment) {
            if segment_end > self.next_offset() {
                break;
            }
            let segment = &self.data[self.index(self.verified)..self.index(segment_end)];
            let hash = blake3::hash(segment);
            if !digest.matches(&hash) {
                let start = self.verified;
                let keep = self.index(self.verified);
                self.data.truncate(keep);
                return Err(Error::HashMismatch {
                    object: self.object.clone(),
                    start,
                    end: segment_end,
                });
            }
            if verification.whole.is_some() {
                self.whole.update(segment);
            }
            self.verified = segment_end;
            self.next_segment += 1;
        }
        Ok(())
    }

    /// Drops what arrived past `offset`, so that the next request asks from
    /// there; verified bytes are always kept.
    pub(super) fn resume_from(&mut self, offset: u64) {
        let keep = offset.clamp(self.verified, self.next_offset());
        let keep = self.index(keep);
        self.data.truncate(keep);
    }

    fn index(&self, offset: u64) -> usize {
        (offset - self.start) as usize
    }

    /// After every segment matched, checks the digest of the whole object;
    /// on a mismatch (a manifest whose chunk hashes disagree with its
    /// component hash) everything is fetched again.
    pub(super) fn check_whole(&mut self) -> Result<(), Error> {
        let Some(Verification {
            whole: Some(digest),
            ..
        }) = self.verification
        else {
            return Ok(());
        };
        if digest.matches(&self.whole.finalize()) {
            return Ok(());
        }
        let end = self.end;
        self.data.clear();
        self.verified = self.start;
        self.next_segment = 0;
        self.whole.reset();
        Err(Error::HashMismatch {
            object: self.object.clone(),
            start: self.start,
            end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verification_of(bytes: &[u8], chunk: usize) -> Verification {
        let mut end = 0u64;
        let segments = bytes
            .chunks(chunk)
            .map(|piece| {
                end += piece.len() as u64;
                (end, Digest::of(piece))
            })
            .collect();
        Verification {
            segments,
            whole: Some(Digest::of(bytes)),
        }
    }

    #[test]
    fn damaged_chunk_is_dropped_back_to_the_last_good_offset() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let verification = verification_of(&bytes, 32);
        let mut assembly =
            Assembly::new("x".into(), 0, 100, Some(&verification)).expect("a small object");
        assembly.push(&bytes[..40]).expect("first chunk is intact");
        let mut damaged = bytes[40..70].to_vec();
        damaged[5] ^= 0x01;
        let error = assembly.push(&damaged).expect_err("the damage is caught");
        assert!(matches!(
            error,
            Error::HashMismatch {
                start: 32,
                end: 64,
                ..
            }
        ));
        assert_eq!(assembly.next_offset(), 32);
        assembly
            .push(&bytes[32..])
            .expect("the resent bytes are intact");
        assembly.check_whole().expect("whole digest matches");
        assert_eq!(assembly.data, bytes);
    }

    #[test]
    fn more_bytes_than_asked_for_are_refused() {
        let mut assembly = Assembly::new("x".into(), 10, 20, None).expect("a small range");
        assert!(matches!(
            assembly.push(&[0u8; 11]),
            Err(Error::LengthMismatch { .. })
        ));
    }

    #[test]
    fn ranges_that_are_inverted_or_too_large_are_refused_before_allocating() {
        assert!(matches!(
            Assembly::new("x".into(), 20, 10, None),
            Err(Error::InvertedRange {
                start: 20,
                end: 10,
                ..
            })
        ));
        assert!(matches!(
            Assembly::new("x".into(), 0, u64::MAX, None),
            Err(Error::ObjectTooLarge { len: u64::MAX, .. })
        ));
        assert!(matches!(
            Assembly::new("x".into(), 1, MAX_COMPONENT_BYTES + 2, None),
            Err(Error::ObjectTooLarge { .. })
        ));
    }
}
