//! Pre-tokenization of ASCII text, by hand: the same pieces as the encodings' split regexes
//! (tiktoken's patterns, which `bpe-openai` runs on a regex engine), checked against them in
//! the tests below. The engine spent some 600 instructions on each piece of an answer, more
//! than counting its tokens; a model's answer is usually plain ASCII, and on ASCII every
//! class of the patterns is one comparison of a byte.
//!
//! The patterns, in the order an anchored leftmost-first search tries them (in ASCII, `\p{L}`
//! is a letter, `\p{Lu}…` an upper-case one, `\p{Ll}…` a lower-case one, `\p{N}` a digit):
//!
//! o200k_base: `[^\r\n\p{L}\p{N}]?[\p{Lu}…]*[\p{Ll}…]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?`,
//! `[^\r\n\p{L}\p{N}]?[\p{Lu}…]+[\p{Ll}…]*(?i:…)?`, `\p{N}{1,3}`, ` ?[^\s\p{L}\p{N}]+[\r\n/]*`,
//! `\s*[\r\n]+`, `\s+(?!\S)`, `\s+`.
//!
//! cl100k_base: `(?i:'s|'t|'re|'ve|'m|'ll|'d)`, `[^\r\n\p{L}\p{N}]?\p{L}+`, `\p{N}{1,3}`,
//! ` ?[^\s\p{L}\p{N}]+[\r\n]*`, `\s*[\r\n]+`, `\s+(?!\S)`, `\s+`.

use super::tokenizer::Encoding;

/// The pieces of `text`, which must be ASCII, as the encoding's regex splits it.
pub(crate) fn split_ascii(encoding: Encoding, text: &str) -> AsciiSplits<'_> {
    debug_assert!(text.is_ascii());
    AsciiSplits {
        text,
        at: 0,
        encoding,
    }
}

pub(crate) struct AsciiSplits<'a> {
    text: &'a str,
    at: usize,
    encoding: Encoding,
}

impl<'a> Iterator for AsciiSplits<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.text.as_bytes();
        if self.at >= bytes.len() {
            return None;
        }
        let start = self.at;
        let end = match self.encoding {
            Encoding::O200kBase => o200k_piece_end(bytes, start),
            Encoding::Cl100kBase => cl100k_piece_end(bytes, start),
        };
        self.at = end;
        self.text.get(start..end)
    }
}

/// Unicode's White_Space in ASCII, which is what the patterns' `\s` means.
fn is_space(byte: u8) -> bool {
    matches!(byte, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

fn is_newline(byte: u8) -> bool {
    matches!(byte, b'\r' | b'\n')
}

/// `[^\r\n\p{L}\p{N}]`: what may stand before a word and become part of its piece.
fn is_word_prefix(byte: u8) -> bool {
    !is_newline(byte) && !byte.is_ascii_alphanumeric()
}

/// `[^\s\p{L}\p{N}]`: punctuation, symbols and control characters.
fn is_symbol(byte: u8) -> bool {
    !is_space(byte) && !byte.is_ascii_alphanumeric()
}

fn run_end(bytes: &[u8], from: usize, class: impl Fn(u8) -> bool) -> usize {
    from + bytes
        .get(from..)
        .unwrap_or_default()
        .iter()
        .take_while(|&&byte| class(byte))
        .count()
}

/// The length of `(?i:'s|'t|'re|'ve|'m|'ll|'d)` at `at`, 0 when none is there.
fn contraction_len(bytes: &[u8], at: usize) -> usize {
    let lower = |offset: usize| bytes.get(at + offset).map(u8::to_ascii_lowercase);
    if bytes.get(at) != Some(&b'\'') {
        return 0;
    }
    match (lower(1), lower(2)) {
        (Some(b's' | b't' | b'm' | b'd'), _) => 2,
        (Some(b'r' | b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => 3,
        _ => 0,
    }
}

/// `\p{N}{1,3}`, looking no further than three bytes: a long number is many pieces.
fn digits_end(bytes: &[u8], at: usize) -> usize {
    let limit = bytes.len().min(at + 3);
    run_end(&bytes[..limit], at, |byte| byte.is_ascii_digit())
}

/// Where a word starts when one starts at `at`: at `at` itself, or after one prefix byte.
fn word_start(bytes: &[u8], at: usize) -> Option<usize> {
    let first = bytes[at];
    if first.is_ascii_alphabetic() {
        Some(at)
    } else if is_word_prefix(first) && bytes.get(at + 1).is_some_and(u8::is_ascii_alphabetic) {
        Some(at + 1)
    } else {
        None
    }
}

/// ` ?P+` followed by a run of `tail`, when it matches at `at`.
fn symbols_end(bytes: &[u8], at: usize, tail: impl Fn(u8) -> bool) -> Option<usize> {
    let first = if bytes[at] == b' ' { at + 1 } else { at };
    if !bytes.get(first).copied().is_some_and(is_symbol) {
        return None;
    }
    let symbols = run_end(bytes, first, is_symbol);
    Some(run_end(bytes, symbols, tail))
}

/// The three whitespace patterns both encodings end with, for the run of whitespace at `at`.
fn space_end(bytes: &[u8], at: usize) -> usize {
    let end = run_end(bytes, at, is_space);
    // `\s*[\r\n]+`: up to and including the run's last line break.
    if let Some(last_break) = bytes[at..end].iter().rposition(|&byte| is_newline(byte)) {
        return at + last_break + 1;
    }
    // `\s+(?!\S)`: the whole run at the end of the text, else all of it but the last byte,
    // which goes with the word after it.
    if end == bytes.len() || end - at == 1 {
        end
    } else {
        end - 1
    }
}

fn o200k_piece_end(bytes: &[u8], at: usize) -> usize {
    if let Some(word) = word_start(bytes, at) {
        let upper = run_end(bytes, word, |byte| byte.is_ascii_uppercase());
        let lower = run_end(bytes, upper, |byte| byte.is_ascii_lowercase());
        return lower + contraction_len(bytes, lower);
    }
    let first = bytes[at];
    if first.is_ascii_digit() {
        return digits_end(bytes, at);
    }
    if let Some(end) = symbols_end(bytes, at, |byte| is_newline(byte) || byte == b'/') {
        return end;
    }
    space_end(bytes, at)
}

fn cl100k_piece_end(bytes: &[u8], at: usize) -> usize {
    let contraction = contraction_len(bytes, at);
    if contraction > 0 {
        return at + contraction;
    }
    if let Some(word) = word_start(bytes, at) {
        return run_end(bytes, word, |byte| byte.is_ascii_alphabetic());
    }
    let first = bytes[at];
    if first.is_ascii_digit() {
        return digits_end(bytes, at);
    }
    if let Some(end) = symbols_end(bytes, at, is_newline) {
        return end;
    }
    space_end(bytes, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn regex_pieces(encoding: Encoding, text: &str) -> Vec<&str> {
        let encoder = match encoding {
            Encoding::O200kBase => bpe_openai::o200k_base(),
            Encoding::Cl100kBase => bpe_openai::cl100k_base(),
        };
        encoder.split(text).collect()
    }

    #[track_caller]
    fn assert_same_pieces(text: &str) {
        for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
            assert_eq!(
                split_ascii(encoding, text).collect::<Vec<_>>(),
                regex_pieces(encoding, text),
                "{} splits {text:?}",
                encoding.name()
            );
        }
    }

    #[test]
    fn pieces_of_prose_code_and_whitespace_are_the_regexes() {
        for text in [
            "",
            "Hello, world! It's 2026: the quick brown fox jumps over the lazy dog.",
            "HTMLParser parsed URLs; the CEO's AI didn't we'LL THEY'RE I'M 'sup 'S 'x '",
            "fn main() {\n    println!(\"{}\", 12345 + 6);\r\n}\n\n\n  \t \n  x",
            "a  b   c \t\td\n \n e\r\n\r\n \tf   ",
            "path/to/file.rs //\n/ ./..//x \"quoted\" ---\n\n--- ... !!!a ?B",
            "\x00\x01\x1c\x1f\x7f \x0b\x0c mixed\x0bcontrols\x0c\x0c",
            "1234567 12.5% $3,000.00 v1.2.3 ABC123def 4o 1st 2ND",
            " ",
            "\n",
            "   ",
            "x ",
            "x  ",
            " \n",
            "'",
            "'re",
            "'R",
        ] {
            assert_same_pieces(text);
        }
    }

    /// Random ASCII from an alphabet weighted toward the bytes the patterns tell apart.
    #[test]
    fn random_ascii_splits_like_the_regexes() {
        const ALPHABET: &[u8] =
            b"aAbZzsSrReEvVlLmMdDtT''''0199  \t\n\r\x0b\x0c.,;:/\\-_!?()\"#$%&*+<=>@[]^`{|}~\x00\x1f\x7f";
        let mut rng = SmallRng::seed_from_u64(20);
        for _ in 0..100_000 {
            let length = rng.random_range(0..40);
            let text: String = (0..length)
                .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
                .collect();
            assert_same_pieces(&text);
        }
    }

    #[test]
    fn every_pair_and_triple_of_classes_splits_like_the_regexes() {
        const SAMPLES: &[u8] = b"aA0 \t\n\r'.//sSReLl\x0b\x7f";
        for &a in SAMPLES {
            for &b in SAMPLES {
                for &c in SAMPLES {
                    for &d in b"  a\n" {
                        let text: String =
                            [a, b, c, d].iter().map(|&byte| char::from(byte)).collect();
                        assert_same_pieces(&text);
                    }
                }
            }
        }
    }
}
