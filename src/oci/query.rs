//! Query strings of the distribution API (`n`, `last`, `artifactType`,
//! `digest`, `mount`, …): one parser and one escaping set for every place
//! graft reads or writes them.

use std::borrow::Cow;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What stays literal in a query value graft writes: the unreserved
/// characters, plus `/` and `:` (media types and digests read better
/// unescaped, and both are allowed in a query by RFC 3986 §3.4).
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/')
    .remove(b':');

/// The `key=value` pairs of a query string, values percent-decoded. `+`
/// stays `+`: media types contain it and clients encode it as `%2B` when
/// they mean it, so reading it as a space would corrupt them.
pub fn pairs(query: &str) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k, percent_decode_str(v).decode_utf8_lossy())
    })
}

/// Appends `key=value` to a path or URL, with `?` or `&` as needed.
pub fn append(target: &mut String, key: &str, value: &str) {
    target.push(if target.contains('?') { '&' } else { '?' });
    target.push_str(key);
    target.push('=');
    target.extend(utf8_percent_encode(value, VALUE));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_plus_is_kept() {
        let mut p = "/v2/a/referrers/sha256:ab".to_string();
        append(&mut p, "artifactType", "application/vnd.a+json");
        append(&mut p, "last", "sha256:cd");
        assert_eq!(
            p,
            "/v2/a/referrers/sha256:ab?artifactType=application/vnd.a%2Bjson&last=sha256:cd"
        );
        let q = p.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let got: Vec<(&str, String)> = pairs(q).map(|(k, v)| (k, v.into_owned())).collect();
        assert_eq!(
            got,
            vec![
                ("artifactType", "application/vnd.a+json".to_string()),
                ("last", "sha256:cd".to_string())
            ]
        );
        let raw: Vec<_> = pairs("artifactType=application/vnd.b+json&mount&&x=").collect();
        assert_eq!(raw[0].1, "application/vnd.b+json");
        assert_eq!((raw[1].0, raw[1].1.as_ref()), ("mount", ""));
        assert_eq!(raw.len(), 3);
    }
}
