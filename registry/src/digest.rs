//! Incremental digest checking.

use oci_spec::image::{Digest, DigestAlgorithm};
use sha2::Digest as _;

use crate::error::{Error, Result};

/// Hashes bytes as they pass and checks them against a digest at the end.
#[derive(Clone)]
pub(crate) enum Hasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A hasher for `digest`'s algorithm; other algorithms are unsupported.
    pub fn for_digest(digest: &Digest) -> Result<Self> {
        match digest.algorithm() {
            DigestAlgorithm::Sha256 => Ok(Hasher::Sha256(sha2::Sha256::new())),
            DigestAlgorithm::Sha384 => Ok(Hasher::Sha384(sha2::Sha384::new())),
            DigestAlgorithm::Sha512 => Ok(Hasher::Sha512(sha2::Sha512::new())),
            other => Err(Error::Unsupported(format!(
                "digest algorithm {other} (of {digest})"
            ))),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// `algorithm:hex` of everything hashed.
    pub fn finish(self) -> String {
        let (alg, bytes) = match self {
            Hasher::Sha256(h) => ("sha256", h.finalize().to_vec()),
            Hasher::Sha384(h) => ("sha384", h.finalize().to_vec()),
            Hasher::Sha512(h) => ("sha512", h.finalize().to_vec()),
        };
        let mut s = String::with_capacity(alg.len() + 1 + bytes.len() * 2);
        s.push_str(alg);
        s.push(':');
        for b in bytes {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Ok when the hashed bytes are `expected`, else [`Error::DigestMismatch`].
    pub fn verify(self, expected: &Digest, what: &str) -> Result<()> {
        let actual = self.finish();
        if actual == expected.as_ref() {
            Ok(())
        } else {
            Err(Error::DigestMismatch {
                what: what.to_string(),
                expected: expected.clone(),
                actual,
            })
        }
    }
}

/// The sha256 digest of `data`.
pub(crate) fn sha256_of(data: &[u8]) -> String {
    let mut h = Hasher::Sha256(sha2::Sha256::new());
    h.update(data);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn verify_and_mismatch() {
        let d = Digest::from_str(&sha256_of(b"hello")).unwrap();
        assert_eq!(
            d.as_ref(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let mut h = Hasher::for_digest(&d).unwrap();
        h.update(b"hel");
        h.update(b"lo");
        h.verify(&d, "x").unwrap();
        let mut h = Hasher::for_digest(&d).unwrap();
        h.update(b"hellO");
        assert!(matches!(
            h.verify(&d, "x"),
            Err(Error::DigestMismatch { .. })
        ));
        let other = Digest::from_str("blake3:abcd").unwrap();
        assert!(matches!(
            Hasher::for_digest(&other),
            Err(Error::Unsupported(_))
        ));
    }
}
