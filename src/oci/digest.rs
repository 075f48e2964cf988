//! `algorithm:encoded` digests (image-spec descriptor.md, "Digests").

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// A syntactically valid digest. For the registered algorithms (sha256,
/// sha512) the encoded part is also checked for exact length and lowercase
/// hex, as the spec requires.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    text: String,
    colon: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest `{0}`")]
pub struct InvalidDigest(String);

impl InvalidDigest {
    /// The text that was refused, to quote back to the client.
    pub fn into_input(self) -> String {
        self.0
    }
}

impl Digest {
    pub fn algorithm(&self) -> &str {
        &self.text[..self.colon]
    }

    pub fn encoded(&self) -> &str {
        &self.text[self.colon + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        let text = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        Digest { text, colon: 6 }
    }

    /// Digest of `bytes` computed with this digest's algorithm, when graft
    /// can compute it.
    pub fn verify(&self, bytes: &[u8]) -> Option<bool> {
        let hex = match self.algorithm() {
            "sha256" => hex::encode(Sha256::digest(bytes)),
            "sha512" => hex::encode(Sha512::digest(bytes)),
            _ => return None,
        };
        Some(hex == self.encoded())
    }

    /// The referrers fallback tag (distribution-spec, "Referrers Tag Schema"):
    /// `<alg>-<ref>`, algorithm cut to 32 characters, encoded part to 64,
    /// anything outside `[a-zA-Z0-9._-]` replaced by `-`.
    pub fn fallback_tag(&self) -> String {
        let clean = |s: &str, max: usize| -> String {
            s.chars()
                .take(max)
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c
                    } else {
                        '-'
                    }
                })
                .collect()
        };
        format!(
            "{}-{}",
            clean(self.algorithm(), 32),
            clean(self.encoded(), 64)
        )
    }

    /// The untruncated form of the fallback tag, which some older clients
    /// wrote before the truncation rule; read as well, never written.
    pub fn untruncated_fallback_tag(&self) -> Option<String> {
        let full = format!("{}-{}", self.algorithm(), self.encoded());
        // Length is not checked: tags past 128 characters break the tag
        // grammar, but a registry that stored one will still serve it.
        (full != self.fallback_tag()
            && full
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
        .then_some(full)
    }
}

impl FromStr for Digest {
    type Err = InvalidDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidDigest(s.to_string());
        let colon = s.find(':').ok_or_else(bad)?;
        let (alg, enc) = (&s[..colon], &s[colon + 1..]);
        if !valid_algorithm(alg) || enc.is_empty() {
            return Err(bad());
        }
        if !enc
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
        {
            return Err(bad());
        }
        let hex_len = match alg {
            "sha256" => Some(64),
            "sha512" => Some(128),
            _ => None,
        };
        if let Some(n) = hex_len {
            if enc.len() != n || !enc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(bad());
            }
        }
        Ok(Digest {
            text: s.to_string(),
            colon,
        })
    }
}

/// `algorithm ::= algorithm-component (algorithm-separator algorithm-component)*`
/// with components `[a-z0-9]+` and separators `[+._-]`.
fn valid_algorithm(alg: &str) -> bool {
    !alg.is_empty()
        && alg.split(['+', '.', '_', '-']).all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";

    #[test]
    fn accepts_registered_and_unregistered_algorithms() {
        let d: Digest = format!("sha256:{HEX}").parse().expect("valid");
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.encoded(), HEX);
        assert!(
            "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8"
                .parse::<Digest>()
                .is_ok()
        );
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "sha256",
            "sha256:",
            ":abc",
            "sha256:zz",
            &format!("sha256:{}", HEX.to_uppercase()),
            &format!("sha256:{}", &HEX[1..]),
            &format!("SHA256:{HEX}"),
            "sha256:../../etc",
            "a..b:abc",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn fallback_tag_follows_the_schema() {
        let d: Digest = format!("sha256:{HEX}").parse().expect("valid");
        assert_eq!(d.fallback_tag(), format!("sha256-{HEX}"));
        assert_eq!(d.untruncated_fallback_tag(), None);
        let hex512 = "a".repeat(128);
        let d: Digest = format!("sha512:{hex512}").parse().expect("valid");
        assert_eq!(d.fallback_tag(), format!("sha512-{}", &hex512[..64]));
        assert_eq!(
            d.untruncated_fallback_tag(),
            Some(format!("sha512-{hex512}"))
        );
        let d: Digest = "a+b:x=y".parse().expect("valid");
        assert_eq!(d.fallback_tag(), "a-b-x-y");
    }

    #[test]
    fn verify_checks_content() {
        let d = Digest::sha256_of(b"hello");
        assert_eq!(d.verify(b"hello"), Some(true));
        assert_eq!(d.verify(b"hellO"), Some(false));
    }
}
