//! Reading JSON from bytes. `serde_json::from_slice` checks the UTF-8 of each string it
//! meets apart (a few hundred instructions for each of a request's and an answer's forty-odd
//! keys and values); text checked once as a whole is parsed from `&str`, where serde_json
//! checks nothing again. A request's top-level members are read as [`Members`]: names and
//! the client's own text of each value, borrowed from the body.

use std::borrow::Cow;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `serde_json::from_slice`, with the UTF-8 checked once for the whole text. Bytes that are
/// not UTF-8 still go through `from_slice`, so they fail with its error, as before.
pub fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

/// A JSON object's members with their values left as the client's text.
#[derive(Default)]
pub struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    /// The members in order, a repeated one only at its last occurrence: that is the value
    /// the request was parsed, routed and counted with.
    pub fn distinct(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        last_of_each(&self.0).map(|(name, value)| (name.as_ref(), *value))
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some((MemberName(name), value)) = map.next_entry()? {
                    members.push((name, value));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// Named items in order, a repeated name only at its last occurrence, as a JSON object's
/// members are read by a parser that keeps the last value. Linear in the number of items: a
/// body of half a million members must not hold a serving lane for minutes.
pub fn last_of_each<'i, 'n, T>(
    items: &'i [(Cow<'n, str>, T)],
) -> impl Iterator<Item = &'i (Cow<'n, str>, T)> + 'i {
    // A handful of items (the usual body or message) is checked pairwise, without allocating.
    const PAIRWISE_UP_TO: usize = 32;
    let last_seen = (items.len() > PAIRWISE_UP_TO).then(|| {
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        let mut last = vec![false; items.len()];
        for (index, (name, _)) in items.iter().enumerate().rev() {
            last[index] = seen.insert(name.as_ref());
        }
        last
    });
    items
        .iter()
        .enumerate()
        .filter(move |(index, (name, _))| match &last_seen {
            Some(last) => last[*index],
            None => !items[index + 1..].iter().any(|(later, _)| later == name),
        })
        .map(|(_, item)| item)
}

/// A member name, borrowed from the body unless it holds escapes.
#[derive(Deserialize)]
pub struct MemberName<'a>(#[serde(borrow)] pub Cow<'a, str>);

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn parses_as_from_slice_does() {
        let text = br#"{"a":"caf\u00e9 \ud83d\ude00","b":[1,2.5,-3e2,null,true],"c":{"d":"\u00e9t\u00e9 \"q\""}}"#;
        assert_eq!(
            from_slice::<Value>(text).unwrap(),
            serde_json::from_slice::<Value>(text).unwrap()
        );
        let raw = "{\"é\":\"日本語\"}".as_bytes();
        assert_eq!(from_slice::<Value>(raw).unwrap()["é"], "日本語");
    }

    #[test]
    fn bytes_that_are_not_utf8_fail_with_from_slices_error() {
        for bytes in [&b"{\"a\":\"\xff\"}"[..], b"{\"a\xc3\":1}", b"\xef\xbb"] {
            let ours = from_slice::<Value>(bytes).unwrap_err().to_string();
            let theirs = serde_json::from_slice::<Value>(bytes)
                .unwrap_err()
                .to_string();
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn a_lone_surrogate_escape_is_refused_as_before() {
        let bytes = br#"{"a":"\ud800"}"#;
        assert!(from_slice::<Value>(bytes).is_err());
        assert!(serde_json::from_slice::<Value>(bytes).is_err());
    }
}
