//! Fuzz targets for what a hostile client or provider controls: the request body (its splice
//! for the provider, its token count and the hand-written split of its ASCII text), the
//! provider's event stream, `routes.toml` and the admin API's JSON. Under `cargo test` each
//! target replays its seeds (`tests/fuzz/<target>/`) and runs random mutations of them for a
//! second; `benches/fuzz.sh` runs them for longer, or under libFuzzer through `cargo bolero`
//! where a nightly toolchain is at hand. An input found to fail goes into the seeds, so it is
//! replayed by every later run.
//!
//! Random bytes are almost never JSON or TOML, so each target mutates real documents: a few
//! byte-level edits at generated offsets, with bytes drawn mostly from the format's own
//! punctuation.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use bolero::{check, generator::TypeGenerator};
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::api::Endpoint;
use crate::config::Config;
use crate::meter::pretokenize::split_ascii;
use crate::meter::tokenizer::{Encoding, Tokenizer};
use crate::stream::SseTap;

/// Bytes an edit inserts: JSON, TOML and SSE punctuation, escapes, multi-byte UTF-8 and a
/// few whole words, so that mutations reach past the first syntax error.
const FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "\\",
    "\\u",
    "\\ud83d",
    "0",
    "-1",
    "1e400",
    "1.5",
    "null",
    "true",
    "false",
    "\n",
    "\r\n",
    "\n\n",
    " ",
    "\t",
    "=",
    "#",
    "'",
    "é",
    "🙂",
    "\u{0}",
    "data: ",
    "[DONE]",
    "model",
    "messages",
    "content",
    "tools",
    "stream",
    "stream_options",
    "include_usage",
    "role",
    "user",
    "text",
    "image_url",
    "usage",
    "choices",
    "delta",
    "tool_calls",
    "arguments",
    "[models.x]",
    "[[router.rules]]",
    "tier",
    "budget_usd",
    "rpm",
    "9999999999999999999999",
    "\"\"",
    "{}",
    "[]",
];

#[derive(Debug, TypeGenerator)]
enum Edit {
    Insert { at: u16, fragment: u8 },
    InsertByte { at: u16, byte: u8 },
    Delete { at: u16, len: u8 },
    Repeat { at: u16, len: u8, times: u8 },
    Truncate { at: u16 },
}

#[derive(Debug, TypeGenerator)]
struct Mutation {
    seed: u8,
    edits: Vec<Edit>,
}

impl Mutation {
    /// One of `seeds`, edited.
    fn apply(&self, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = seeds[usize::from(self.seed) % seeds.len()].clone();
        for edit in self.edits.iter().take(8) {
            let at = |at: u16| usize::from(at) % (bytes.len() + 1);
            match *edit {
                Edit::Insert { at: a, fragment } => {
                    let fragment = FRAGMENTS[usize::from(fragment) % FRAGMENTS.len()];
                    let a = at(a);
                    bytes.splice(a..a, fragment.bytes());
                }
                Edit::InsertByte { at: a, byte } => {
                    let a = at(a);
                    bytes.insert(a, byte);
                }
                Edit::Delete { at: a, len } => {
                    let a = at(a);
                    let end = (a + usize::from(len)).min(bytes.len());
                    bytes.drain(a..end);
                }
                Edit::Repeat { at: a, len, times } => {
                    let a = at(a);
                    let end = (a + usize::from(len)).min(bytes.len());
                    let piece = bytes[a..end].to_vec();
                    for _ in 0..times % 16 {
                        bytes.splice(end..end, piece.iter().copied());
                    }
                }
                Edit::Truncate { at: a } => bytes.truncate(at(a)),
            }
        }
        bytes
    }
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz")
        .join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    let seeds: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

static TOKENIZER: LazyLock<Tokenizer> = LazyLock::new(|| Tokenizer::new().unwrap());
/// A second tokenizer with a different cache history: counts may not depend on what a cache
/// happens to hold.
static TOKENIZER_COLD: LazyLock<Tokenizer> = LazyLock::new(|| Tokenizer::new().unwrap());

static DETECTORS: LazyLock<crate::route::signals::Detectors> = LazyLock::new(|| {
    crate::route::signals::Detectors::new(&["prove".to_owned()], &["hi".to_owned()]).unwrap()
});

fn object(bytes: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// The body spliced for the provider holds the client's members, values unchanged, with the
/// provider's model name and usage asked for on streams; any JSON object splices.
#[test]
fn splice() {
    let seeds = seeds("chat");
    check!()
        .with_type::<(Mutation, bool)>()
        .for_each(|(mutation, stream)| {
            let client = mutation.apply(&seeds);
            let spliced = crate::upstream::upstream_body(
                &client,
                "provider-model",
                Endpoint::ChatCompletions,
                *stream,
            );
            let Some(members) = object(&client) else {
                return;
            };
            // Requests whose options are not an object are refused before they are spliced.
            if *stream
                && !members
                    .get("stream_options")
                    .is_none_or(|o| o.is_object() || o.is_null())
            {
                return;
            }
            let (body, strip) = spliced.expect("a JSON object splices");
            let sent = object(&body).expect("the spliced body is a JSON object");
            assert_eq!(sent["model"], "provider-model");
            for (name, value) in &members {
                if name != "model" && name != "stream_options" {
                    assert_eq!(&sent[name], value, "member {name}");
                }
            }
            assert_eq!(
                sent.len(),
                members.len()
                    + usize::from(!members.contains_key("model"))
                    + usize::from(*stream && !members.contains_key("stream_options"))
            );
            if *stream {
                assert_eq!(sent["stream_options"]["include_usage"], true);
                let asked = members
                    .get("stream_options")
                    .and_then(|options| options.get("include_usage"))
                    == Some(&Value::Bool(true));
                assert_eq!(strip, !asked);
            }
        });
}

/// Any JSON body counts without a panic, the same on every call, whatever the caches hold, and
/// the same read as a `Value` or with its messages borrowed (and routed the same).
#[test]
fn chat_count() {
    let seeds = seeds("chat");
    check!()
        .with_type::<(Mutation, bool)>()
        .for_each(|(mutation, cold)| {
            let bytes = mutation.apply(&seeds);
            let Ok(body) = serde_json::from_slice::<Value>(&bytes) else {
                return;
            };
            // Read with its messages borrowed, the body counts and routes as its `Value` does.
            let view = crate::json::from_slice::<crate::meter::prompt::ChatBody>(&bytes).ok();
            if body.is_object() {
                assert!(
                    view.is_some(),
                    "an object that parses as a Value reads as a view"
                );
            }
            if let Some(view) = &view {
                assert_eq!(
                    crate::route::signals::measure(view, 7, &DETECTORS),
                    crate::route::signals::measure(&body, 7, &DETECTORS)
                );
                assert_eq!(
                    crate::route::last_user_text(view),
                    crate::route::last_user_text(&body)
                );
            }
            let view = view.map(|view| {
                [Encoding::O200kBase, Encoding::Cl100kBase]
                    .map(|encoding| TOKENIZER.count_chat_prompt(encoding, &view))
            });
            for (index, encoding) in [Encoding::O200kBase, Encoding::Cl100kBase]
                .into_iter()
                .enumerate()
            {
                let first = TOKENIZER.count_chat_prompt(encoding, &body);
                assert_eq!(TOKENIZER.count_chat_prompt(encoding, &body), first);
                if *cold {
                    assert_eq!(TOKENIZER_COLD.count_chat_prompt(encoding, &body), first);
                }
                if let Some(counts) = view {
                    assert_eq!(counts[index], first, "the view's count");
                }
            }
        });
}

/// ASCII text is cut by hand into the same pieces as the encodings' regexes cut it, whatever
/// the text: the mutations of JSON bodies give punctuation, digits, whitespace and contractions
/// in every order (bytes outside ASCII are dropped, since that text takes the regex).
#[test]
fn ascii_pieces() {
    let seeds = seeds("chat");
    check!().with_type::<Mutation>().for_each(|mutation| {
        let text: String = mutation
            .apply(&seeds)
            .into_iter()
            .filter(u8::is_ascii)
            .map(char::from)
            .collect();
        for (encoding, encoder) in [
            (Encoding::O200kBase, bpe_openai::o200k_base()),
            (Encoding::Cl100kBase, bpe_openai::cl100k_base()),
        ] {
            assert_eq!(
                split_ascii(encoding, &text).collect::<Vec<_>>(),
                encoder.split(&text).collect::<Vec<_>>(),
                "{}",
                encoding.name()
            );
        }
    });
}

/// However a provider's stream is cut into reads, the tap passes the same bytes and reads the
/// same usage and output as from one read; without a usage chunk to strip it passes every
/// complete event unchanged.
#[test]
fn sse_tap() {
    let seeds = seeds("sse");
    check!()
        .with_type::<(Mutation, Vec<u16>, bool)>()
        .for_each(|(mutation, cuts, strip)| {
            let stream = Bytes::from(mutation.apply(&seeds));
            let mut whole = SseTap::new(*strip);
            let passed_whole = whole.feed(stream.clone());

            let mut cuts: Vec<usize> = cuts
                .iter()
                .map(|cut| usize::from(*cut) % (stream.len() + 1))
                .collect();
            cuts.sort_unstable();
            let mut pieces = SseTap::new(*strip);
            let mut passed = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([stream.len()]) {
                passed.extend_from_slice(&pieces.feed(stream.slice(start..cut)));
                start = cut;
            }

            assert_eq!(passed, passed_whole);
            assert_eq!(pieces.unfinished(), whole.unfinished());
            assert_eq!(pieces.usage, whole.usage);
            assert_eq!(pieces.saw_done, whole.saw_done);
            assert_eq!(
                pieces.output.finish(&TOKENIZER, Encoding::O200kBase),
                whole.output.finish(&TOKENIZER, Encoding::O200kBase)
            );
            assert_eq!(pieces.output.finish_reason(), whole.output.finish_reason());
            if !*strip {
                assert_eq!(passed.len() + whole.unfinished(), stream.len());
                assert_eq!(passed, stream[..passed.len()]);
            }
        });
}

/// Any `routes.toml` loads or is refused with a message naming the file; nothing panics.
#[test]
fn routes_toml() {
    let seeds = seeds("routes");
    check!().with_type::<Mutation>().for_each(|mutation| {
        let bytes = mutation.apply(&seeds);
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return;
        };
        if let Err(error) = Config::parse(text, Path::new("fuzz/routes.toml")) {
            let message = error.to_string();
            assert!(message.contains("fuzz/routes.toml"), "{message}");
        }
    });
}

/// Any admin body gets a JSON answer (never a 5xx), and a refused one changes nothing: a bad
/// create makes no key, a bad update leaves the key as it was.
#[test]
fn admin_json() {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let seeds = seeds("admin");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let data_dir = std::env::temp_dir().join(format!("tollgate-fuzz-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir_all(&data_dir).unwrap();
    let routes = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("routes.toml"))
        .unwrap()
        .replace(
            "data_dir = \"data\"",
            &format!("data_dir = {:?}", data_dir.display().to_string()),
        );
    let config = Config::parse(&routes, Path::new("routes.toml")).unwrap();
    let app: Arc<crate::app::App> = runtime.block_on(async {
        crate::server::Gateway::start(config, Some("admin-token".to_owned()))
            .await
            .unwrap()
            .app
    });
    let router = crate::server::router(app, true);
    let call = |method: &str, path: &str, body: Vec<u8>| -> (u16, Value) {
        runtime.block_on(async {
            let request = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", "Bearer admin-token")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap();
            let response = router.clone().oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!("{status}: not JSON: {}", String::from_utf8_lossy(&bytes))
            });
            (status, body)
        })
    };
    // A failing input unwinds out of the closure; the router is not used after that.
    let call = std::panic::AssertUnwindSafe(call);
    let call = move |method: &str, path: &str, body: Vec<u8>| {
        let call = &call;
        (call.0)(method, path, body)
    };
    let keys = || call("GET", "/admin/keys", Vec::new()).1;
    let (status, created) = call(
        "POST",
        "/admin/keys",
        br#"{"name":"steady","budget_usd":5}"#.to_vec(),
    );
    assert_eq!(status, 201, "{created}");
    let steady = format!("/admin/keys/{}", created["id"].as_str().unwrap());
    let steady_before = call("GET", &steady, Vec::new()).1;

    check!()
        .with_type::<(Mutation, bool)>()
        .for_each(|(mutation, update)| {
            let body = mutation.apply(&seeds);
            let listed = keys();
            let (status, answer) = if *update {
                call("PATCH", &steady, body)
            } else {
                call("POST", "/admin/keys", body)
            };
            assert!(status < 500, "{status}: {answer}");
            if status == 200 || status == 201 {
                if *update {
                    let restore = br#"{"name":"steady","budget_usd":5,"budget_period":"month","rpm":null,"tpm":null,"max_concurrency":null,"models":null,"plan":null,"owner":null,"team":null,"customer":null,"seats":1}"#;
                    assert_eq!(call("PATCH", &steady, restore.to_vec()).0, 200);
                }
                return;
            }
            assert!(answer["error"]["message"].is_string(), "{answer}");
            assert_eq!(keys(), listed, "a refused write changed the keys");
            if *update {
                assert_eq!(call("GET", &steady, Vec::new()).1, steady_before);
            }
        });
    drop(router);
    runtime.shutdown_background();
    let _ = std::fs::remove_dir_all(&data_dir);
}
