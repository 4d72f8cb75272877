//! A stable 64-bit fingerprint of request fields (FNV-1a with length prefixes).
//!
//! Used where a value must be recognised again later, possibly by another process or
//! release: a page token remembers the filters it was issued for, and an idempotent create
//! remembers the request it answered. `std`'s hasher is not stable across releases, so it
//! cannot serve. Not a defence against forgery: tokens are opaque, not secret.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// Builds a fingerprint from typed parts.
#[derive(Clone, Copy, Debug)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Self(OFFSET)
    }
}

impl Fingerprint {
    /// An empty fingerprint.
    pub fn new() -> Self {
        Self::default()
    }

    fn bytes(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(PRIME);
        }
        self
    }

    /// Adds a byte string, length-prefixed so that ("ab", "c") differs from ("a", "bc").
    pub fn with_bytes(self, bytes: &[u8]) -> Self {
        self.bytes(&(bytes.len() as u64).to_le_bytes()).bytes(bytes)
    }

    /// Adds a string.
    pub fn with_str(self, text: &str) -> Self {
        self.with_bytes(text.as_bytes())
    }

    /// Adds an integer.
    pub fn with_i64(self, n: i64) -> Self {
        self.bytes(&n.to_le_bytes())
    }

    /// The fingerprint.
    pub fn finish(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable_and_separate_fields() {
        let a = Fingerprint::new().with_str("ab").with_str("c").finish();
        let b = Fingerprint::new().with_str("a").with_str("bc").finish();
        assert_ne!(a, b);
        assert_eq!(a, Fingerprint::new().with_str("ab").with_str("c").finish());
        // Pinned: a change of algorithm would invalidate tokens in flight.
        assert_eq!(Fingerprint::new().finish(), 0xcbf2_9ce4_8422_2325);
        assert_eq!(
            Fingerprint::new().with_i64(1).finish(),
            Fingerprint::new().with_i64(1).finish()
        );
    }
}
