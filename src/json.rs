//! Reading JSON from bytes. `serde_json::from_slice` checks the UTF-8 of each string it
//! meets apart (a few hundred instructions for each of a request's and an answer's forty-odd
//! keys and values); text checked once as a whole is parsed from `&str`, where serde_json
//! checks nothing again.

use serde::Deserialize;

/// `serde_json::from_slice`, with the UTF-8 checked once for the whole text. Bytes that are
/// not UTF-8 still go through `from_slice`, so they fail with its error, as before.
pub fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

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
