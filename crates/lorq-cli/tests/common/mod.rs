//! Running the `lorq` binary from the CLI tests, and the fixture paths they use.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// `fixtures/<p>` as a string argument.
pub fn fixture(p: &str) -> String {
    fixtures().join(p).to_str().unwrap().to_string()
}

pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lorq"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `lorq args`, which must succeed; panics with its stderr otherwise.
pub fn run_ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "lorq {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `lorq args` and parses its standard output as JSON; panics with stderr on failure.
pub fn lorq(args: &[&str]) -> Value {
    let out = run_ok(args);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lorq {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs `lorq args --json path` (a bench) and returns its standard output and the JSON report
/// written to `path`; panics with stderr on failure.
pub fn lorq_report(args: &[&str], path: &Path) -> (String, Value) {
    let path_arg = path.to_str().expect("a UTF-8 temporary path");
    let out = run_ok(&[args, &["--json", path_arg]].concat());
    let report = std::fs::read_to_string(path).unwrap();
    let v = serde_json::from_str(&report).unwrap_or_else(|e| panic!("{path:?}: not JSON ({e})"));
    (String::from_utf8_lossy(&out.stdout).into_owned(), v)
}

/// Runs `lorq args`, which must fail, and returns its standard error.
pub fn lorq_fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "lorq {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
/// A JSON array of numbers as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a JSON array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// `lorq score ARGS --full-logits --json`: the whole vocabulary's logits at the last position.
pub fn score_last_logits(args: &[&str]) -> Vec<f32> {
    let mut all = vec!["score"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--full-logits", "--json"]);
    floats(&lorq(&all)["last_logits"])
}

/// max |a − b| / max |b|.
pub fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    d / b.iter().fold(0f32, |m, v| m.max(v.abs()))
}

pub mod server;
