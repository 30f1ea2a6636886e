//! Running the `lorq` binary from the CLI tests, and the fixture paths they use.
#![allow(dead_code)]

use std::path::PathBuf;
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

/// Runs `lorq args` and parses its standard output as JSON; panics with stderr on failure.
pub fn lorq(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "lorq {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lorq {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs `lorq args`, which must fail, and returns its standard error.
pub fn lorq_fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "lorq {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
pub mod server;
