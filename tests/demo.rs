//! `tollgate demo`, the README's first command: every line it prints to paste works as printed
//! (the Python lines with the test venv's interpreter, which has the `openai` SDK).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn every_line_the_demo_prints_works_when_pasted() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut demo = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["demo", "--listen", "127.0.0.1:0", "--config"])
        .arg(root.join("routes.toml"))
        .env("TOLLGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut printed = Vec::new();
    // Held open until the demo is stopped, as a terminal would be.
    let mut stdout = BufReader::new(demo.stdout.take().unwrap()).lines();
    for line in stdout.by_ref() {
        let line = line.unwrap();
        let last = line.contains("/metrics");
        printed.push(line);
        if last {
            break;
        }
    }
    let python = common::python();
    let pasted: Vec<&String> = printed
        .iter()
        .filter(|line| line.starts_with("  curl ") || line.starts_with("  python3 "))
        .collect();
    assert_eq!(pasted.len(), 8, "{printed:#?}");
    let mut answers = Vec::new();
    for line in pasted {
        let command = line
            .trim()
            .replacen("python3 ", &format!("{} ", python.display()), 1);
        let output = Command::new("bash")
            .args(["-c", &command])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success() && !stdout.trim().is_empty(),
            "{command}\n{}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        answers.push(stdout);
    }
    let _ = demo.kill();
    let _ = demo.wait();
    assert!(
        answers[0].contains("\"object\":\"chat.completion\""),
        "{}",
        answers[0]
    );
    assert!(answers[1].contains("data: [DONE]"), "{}", answers[1]);
    assert!(
        answers[3].contains("\"object\":\"response\""),
        "{}",
        answers[3]
    );
    assert!(answers[4].contains("input_tokens="), "{}", answers[4]);
    assert!(
        answers[5].contains("cache_read_input_tokens="),
        "{}",
        answers[5]
    );
    assert!(answers[6].contains("\"spend_usd\""), "{}", answers[6]);
    assert!(
        answers[7].contains("tollgate_requests_total{"),
        "{}",
        answers[7]
    );
}
