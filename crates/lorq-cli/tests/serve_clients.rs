//! The real clients (lorax-client, text-generation, openai; installed by scripts/test.sh into
//! .venv-clients) against `lorq serve`: a tiny fixture model with two adapters, and the default
//! model. Every output must equal `lorq generate` for the same request; `merged_adapters` must
//! equal a model merged offline by `lorq merge`; `response_format` must give JSON that parses
//! and matches its schema.

mod common;

use std::path::Path;
use std::process::Command;

use common::server::{client_python, copy_dir, Server};
use common::{fixture, fixtures, lorq};
use serde_json::{json, Value};

fn python_or_skip() -> Option<std::path::PathBuf> {
    match client_python() {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("CI must run the client tests: scripts/test.sh creates .venv-clients")
        }
        None => {
            eprintln!(
                "SKIPPED: no Python with the client libraries (run scripts/test.sh, which makes .venv-clients, or set LORQ_TEST_CLIENT_PYTHON)"
            );
            None
        }
    }
}

/// Runs tests/clients/run_clients.py against `url` with `cases`; returns results by name.
fn run_clients(python: &Path, url: &str, cases: &Value) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cases.json");
    std::fs::write(&path, cases.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients/run_clients.py");
    let out = Command::new(python)
        .arg(script)
        .arg(url)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (name, r) in v.as_object().unwrap() {
        assert!(
            r.get("error").is_none(),
            "client call {name} failed: {}",
            r["error"]
        );
    }
    v
}

/// `lorq generate ... --json` for the same request.
fn generate(
    model: &str,
    adapter: Option<&Path>,
    prompt: &str,
    max_new: usize,
    extra: &[&str],
) -> Value {
    let max_new = max_new.to_string();
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--max-new-tokens",
        &max_new,
        "--json",
    ];
    let adapter_s;
    if let Some(a) = adapter {
        adapter_s = a.to_str().unwrap().to_string();
        args.extend(["--adapter", &adapter_s]);
    }
    args.extend(extra);
    lorq(&args)
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn clients_on_the_tiny_model_match_lorq_generate() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama/adapters");
    let a_dir = root.path().join("org/a");
    let b_dir = root.path().join("org/b");
    copy_dir(&src.join("r8-all"), &a_dir);
    copy_dir(&src.join("r4-rslora-qv-bf16"), &b_dir);
    let base = fixture("llama/base");
    let server = Server::start(&base, &["--adapter-dir", root.path().to_str().unwrap()]);
    let prompt = "The quick brown fox";
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "maxItems": 3}
        },
        "required": ["name", "age", "tags"]
    });
    let merged = json!({"ids": ["org/a", "org/b"], "weights": [0.6, 0.4], "merge_strategy": "linear", "density": 1.0, "majority_sign_method": "total"});
    let cases = json!([
        {"name": "lorax_base", "client": "lorax", "call": "generate", "args": {"prompt": prompt, "max_new_tokens": 8}},
        {"name": "lorax_a", "client": "lorax", "call": "generate", "args": {"prompt": prompt, "max_new_tokens": 8, "adapter_id": "org/a", "adapter_source": "local"}},
        {"name": "lorax_stream_b", "client": "lorax", "call": "generate_stream", "args": {"prompt": prompt, "max_new_tokens": 8, "adapter_id": "org/b"}},
        {"name": "lorax_sample_a", "client": "lorax", "call": "generate_stream", "args": {"prompt": prompt, "max_new_tokens": 8, "adapter_id": "org/a", "do_sample": true, "seed": 7, "temperature": 0.5}},
        {"name": "lorax_merged", "client": "lorax", "call": "generate", "args": {"prompt": prompt, "max_new_tokens": 8, "merged_adapters": merged}},
        {"name": "lorax_json", "client": "lorax", "call": "generate", "args": {"prompt": prompt, "max_new_tokens": 96, "adapter_id": "org/a", "response_format": {"type": "json_object", "schema": schema}}},
        {"name": "tgi_base", "client": "tgi", "call": "generate", "args": {"prompt": prompt, "max_new_tokens": 8}},
        {"name": "tgi_stream", "client": "tgi", "call": "generate_stream", "args": {"prompt": prompt, "max_new_tokens": 8}},
        {"name": "openai_completion_a", "client": "openai", "call": "completion", "args": {"model": "org/a", "prompt": prompt, "max_tokens": 8, "temperature": 0.0}},
        {"name": "openai_completion_stream_b", "client": "openai", "call": "completion_stream", "args": {"model": "org/b", "prompt": prompt, "max_tokens": 8, "temperature": 0.0}},
        {"name": "openai_chat_base", "client": "openai", "call": "chat", "args": {"model": "", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0.0}},
        {"name": "openai_chat_stream_a", "client": "openai", "call": "chat_stream", "args": {"model": "org/a", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0.0}},
        {"name": "openai_json", "client": "openai", "call": "chat", "args": {"model": "org/b", "messages": [{"role": "user", "content": prompt}], "max_tokens": 96, "temperature": 0.0, "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}}},
        {"name": "openai_models", "client": "openai", "call": "models", "args": {}}
    ]);
    let r = run_clients(&python, &server.url, &cases);

    let base_ref = generate(&base, None, prompt, 8, &[]);
    let a_ref = generate(&base, Some(&a_dir), prompt, 8, &[]);
    let b_ref = generate(&base, Some(&b_dir), prompt, 8, &[]);
    for (name, reference) in [
        ("lorax_base", &base_ref),
        ("lorax_a", &a_ref),
        ("lorax_stream_b", &b_ref),
        ("tgi_base", &base_ref),
        ("tgi_stream", &base_ref),
    ] {
        assert_eq!(r[name]["text"], reference["text"], "{name}");
        assert_eq!(
            ids(&r[name]["token_ids"]),
            ids(&reference["token_ids"]),
            "{name}"
        );
    }
    assert_eq!(r["lorax_base"]["finish_reason"], "length");
    assert_eq!(
        r["lorax_base"]["prompt_tokens"].as_u64().unwrap() as usize,
        base_ref["prompt_ids"].as_array().unwrap().len()
    );
    // Adapters change the output (else the comparisons above would prove little).
    assert_ne!(a_ref["token_ids"], base_ref["token_ids"]);
    assert_eq!(r["openai_completion_a"]["text"], a_ref["text"]);
    assert_eq!(r["openai_completion_stream_b"]["text"], b_ref["text"]);
    let sample_ref = generate(
        &base,
        Some(&a_dir),
        prompt,
        8,
        &["--do-sample", "--seed", "7", "--temperature", "0.5"],
    );
    assert_eq!(r["lorax_sample_a"]["text"], sample_ref["text"]);
    let chat_base = generate(&base, None, prompt, 8, &["--chat"]);
    let chat_a = generate(&base, Some(&a_dir), prompt, 8, &["--chat"]);
    assert_eq!(r["openai_chat_base"]["text"], chat_base["text"]);
    assert_eq!(r["openai_chat_stream_a"]["text"], chat_a["text"]);
    let models: Vec<&str> = r["openai_models"]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(
        models.contains(&"base") && models.contains(&"org/a") && models.contains(&"org/b"),
        "{models:?}"
    );

    // merged_adapters = a model merged offline in ΔW space by `lorq merge` (f32).
    let merged_dir = tempfile::tempdir().unwrap();
    let out = merged_dir.path().join("m");
    let out_s = out.to_str().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_lorq"))
        .args([
            "merge",
            "--model",
            &base,
            "--adapter",
            a_dir.to_str().unwrap(),
            "--adapter",
            b_dir.to_str().unwrap(),
        ])
        .args([
            "--weights",
            "0.6,0.4",
            "--merge-strategy",
            "linear",
            "--dtype",
            "f32",
            "--out",
            out_s,
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "lorq merge failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let merged_ref = generate(out_s, None, prompt, 8, &[]);
    assert_eq!(r["lorax_merged"]["text"], merged_ref["text"]);
    assert_eq!(
        ids(&r["lorax_merged"]["token_ids"]),
        ids(&merged_ref["token_ids"])
    );
    assert_ne!(merged_ref["token_ids"], a_ref["token_ids"]);

    // response_format: the same text as `lorq generate --response-schema`, JSON that parses and
    // matches the schema.
    let schema_s = schema.to_string();
    let json_ref = generate(
        &base,
        Some(&a_dir),
        prompt,
        96,
        &["--response-schema", &schema_s],
    );
    assert_eq!(r["lorax_json"]["text"], json_ref["text"]);
    for name in ["lorax_json", "openai_json"] {
        let text = r[name]["text"].as_str().unwrap();
        let v: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{name}: {text:?} is not JSON: {e}"));
        let o = v
            .as_object()
            .unwrap_or_else(|| panic!("{name}: {v} is not an object"));
        assert!(o["name"].as_str().unwrap().chars().count() <= 12, "{v}");
        assert!(o["age"].is_i64() || o["age"].is_u64(), "{v}");
        let tags = o["tags"].as_array().unwrap();
        assert!(
            tags.len() <= 3 && tags.iter().all(|t| t == "x" || t == "y"),
            "{v}"
        );
        assert_eq!(o.len(), 3, "{v}");
        // Properties come in schema order.
        assert!(text.starts_with("{\"name\":"), "{text}");
    }
}

#[test]
fn clients_on_the_default_model_match_lorq_generate() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let server = Server::start("default", &[]);
    let q = "What is the capital of France?";
    let cases = json!([
        {"name": "chat", "client": "openai", "call": "chat", "args": {"model": "", "messages": [{"role": "user", "content": q}], "max_tokens": 12, "temperature": 0.0}},
        {"name": "chat_stream", "client": "openai", "call": "chat_stream", "args": {"model": "", "messages": [{"role": "user", "content": q}], "max_tokens": 12, "temperature": 0.0}},
        {"name": "lorax", "client": "lorax", "call": "generate", "args": {"prompt": "The capital of France is", "max_new_tokens": 6}},
        {"name": "tgi_stream", "client": "tgi", "call": "generate_stream", "args": {"prompt": "The capital of France is", "max_new_tokens": 6}}
    ]);
    let r = run_clients(&python, &server.url, &cases);
    let chat = generate("default", None, q, 12, &["--chat"]);
    assert_eq!(r["chat"]["text"], chat["text"]);
    assert_eq!(r["chat_stream"]["text"], chat["text"]);
    assert!(chat["text"].as_str().unwrap().contains("Paris"), "{chat}");
    let plain = generate("default", None, "The capital of France is", 6, &[]);
    assert_eq!(r["lorax"]["text"], plain["text"]);
    assert_eq!(ids(&r["lorax"]["token_ids"]), ids(&plain["token_ids"]));
    assert_eq!(r["tgi_stream"]["text"], plain["text"]);
}
