//! Repository names and manifest references (distribution-spec, "Pulling
//! manifests": the `<name>` and `<reference>` grammars).

use std::fmt;

use super::Digest;

/// A repository name matching
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid repository name `{0}`")]
pub struct InvalidName(String);

impl InvalidName {
    /// The name that was refused, to quote back to the client.
    pub fn into_input(self) -> String {
        self.0
    }
}

impl RepoName {
    pub fn parse(s: &str) -> Result<RepoName, InvalidName> {
        // Clients commonly cap host + name at 255; names past that are
        // refused by distribution too.
        if s.is_empty() || s.len() > 255 || !s.split('/').all(valid_component) {
            return Err(InvalidName(s.to_string()));
        }
        Ok(RepoName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__`, or any number of `-`.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `<reference>` of a manifest path: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    /// A digest when the string contains `:` (tags cannot), else a tag.
    pub fn parse(s: &str) -> Option<Reference> {
        if s.contains(':') {
            s.parse().ok().map(Reference::Digest)
        } else if Reference::is_tag(s) {
            Some(Reference::Tag(s.to_string()))
        } else {
            None
        }
    }

    /// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
    pub fn is_tag(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_grammar() {
        for ok in ["a", "library/ubuntu", "a.b/c_d/e__f", "a--b", "x-y/z9"] {
            assert!(RepoName::parse(ok).is_ok(), "{ok} refused");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "a/../b", "a/./b", "a b",
            "a%2fb",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn references_are_tags_or_digests() {
        assert_eq!(
            Reference::parse("latest"),
            Some(Reference::Tag("latest".into()))
        );
        assert!(matches!(
            Reference::parse(&format!("sha256:{}", "0".repeat(64))),
            Some(Reference::Digest(_))
        ));
        assert_eq!(Reference::parse("sha256:nothex"), None);
        assert_eq!(Reference::parse(".hidden"), None);
        assert_eq!(Reference::parse(&"t".repeat(129)), None);
    }
}
