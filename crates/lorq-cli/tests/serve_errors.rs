//! `lorq serve` on the tiny fixture model: every kind of bad request gets the right 4xx with a
//! message naming the problem, and the server keeps serving; overload, auth, disconnects and
//! graceful shutdown.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::server::{copy_dir, http, post, post_sse, Server};
use common::{fixture, fixtures};
use serde_json::{json, Value};

/// An adapter root with good adapters and broken ones.
fn adapter_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama/adapters");
    copy_dir(&src.join("r8-all"), &root.path().join("org/a"));
    // Wrong shapes: a Mistral fixture adapter (other dimensions) under a Llama server.
    copy_dir(
        &fixtures().join("mistral/adapters").join(
            std::fs::read_dir(fixtures().join("mistral/adapters"))
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .file_name(),
        ),
        &root.path().join("bad/shapes"),
    );
    // A corrupt weights file.
    copy_dir(&src.join("r8-all"), &root.path().join("bad/corrupt"));
    let f = root.path().join("bad/corrupt/adapter_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 3]).unwrap();
    root
}

fn err_of(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

fn good(server: &Server) {
    let (s, v) = post(
        &format!("{}/generate", server.url),
        &json!({"inputs": "hello world", "parameters": {"max_new_tokens": 3, "adapter_id": "org/a"}}),
    );
    assert_eq!(s, 200, "server stopped serving: {v}");
    assert!(v["generated_text"].is_string(), "{v}");
}

#[test]
fn bad_requests_get_clear_4xx_and_the_server_keeps_serving() {
    let root = adapter_root();
    let server = Server::start(
        &fixture("llama/base"),
        &[
            "--adapter-dir",
            root.path().to_str().unwrap(),
            "--max-input-length",
            "32",
            "--max-total-tokens",
            "4096",
            "--max-batch-prefill-tokens",
            "4096",
        ],
    );
    let gen = format!("{}/generate", server.url);
    let mistral_dims = fixtures().join("mistral/base/config.json");
    let _ = mistral_dims;
    good(&server);

    // Malformed JSON: 400 naming the syntax error.
    let r = http()
        .post(&gen)
        .header("content-type", "application/json")
        .body("{\"inputs\": \"a\", ")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().unwrap();
    assert!(err_of(&v).contains("not valid JSON"), "{v}");
    assert_eq!(v["error_type"], "validation");
    good(&server);

    let cases: Vec<(Value, u16, Vec<&str>)> = vec![
        (json!({"inputs": 5}), 422, vec!["inputs", "invalid type"]),
        (
            json!({"inputs": "a", "parameters": {"max_new_tokens": "x"}}),
            422,
            vec!["parameters.max_new_tokens"],
        ),
        (
            json!({"inputs": "a", "parameters": {"adapter_id": "org/missing"}}),
            404,
            vec!["org/missing", "not found"],
        ),
        (
            json!({"inputs": "a", "parameters": {"adapter_id": "../../etc"}}),
            422,
            vec!["traversal"],
        ),
        (
            json!({"inputs": "a", "parameters": {"adapter_id": "/etc/passwd"}}),
            422,
            vec!["absolute"],
        ),
        (
            json!({"inputs": "a", "parameters": {"adapter_id": "bad/shapes"}}),
            422,
            vec!["bad/shapes"],
        ),
        (
            json!({"inputs": "a", "parameters": {"adapter_id": "bad/corrupt"}}),
            422,
            vec!["bad/corrupt", "adapter_model.safetensors"],
        ),
        (
            json!({"inputs": "hello ".repeat(100)}),
            422,
            vec!["max-input-length"],
        ),
        (
            json!({"inputs": "a", "parameters": {"max_new_tokens": 0}}),
            422,
            vec!["max_new_tokens"],
        ),
        (
            json!({"inputs": "a", "parameters": {"max_new_tokens": 4000000000u64}}),
            422,
            vec!["max-total-tokens"],
        ),
        (
            json!({"inputs": "a", "parameters": {"top_p": 1.5}}),
            422,
            vec!["top_p", "1.5"],
        ),
        (
            json!({"inputs": "a", "parameters": {"stop": vec!["x"; 1000]}}),
            422,
            vec!["stop", "1000"],
        ),
        (
            json!({"inputs": "a", "parameters": {"watermark": true}}),
            422,
            vec!["watermark"],
        ),
        (
            json!({"inputs": "a", "parameters": {"adapter_id": "org/a", "adapter_source": "hub"}}),
            422,
            vec!["adapter_source", "hub"],
        ),
        (
            json!({"inputs": "a", "parameters": {"temperature": -1.0}}),
            422,
            vec!["temperature"],
        ),
        (json!({"inputs": ""}), 422, vec!["empty"]),
    ];
    for (body, status, needles) in cases {
        let (s, v) = post(&gen, &body);
        assert_eq!(s, status, "{body} -> {v}");
        let msg = err_of(&v);
        for n in needles {
            assert!(msg.contains(n), "{body}: {msg:?} lacks {n:?}");
        }
        assert!(v["error_type"].is_string(), "{v}");
        good(&server);
    }

    // The same problems through the OpenAI route.
    let (s, v) = post(
        &format!("{}/v1/completions", server.url),
        &json!({"model": "org/missing", "prompt": "a", "max_tokens": 2}),
    );
    assert_eq!(s, 404, "{v}");
    let (s, v) = post(
        &format!("{}/v1/chat/completions", server.url),
        &json!({"model": "", "messages": "not a list"}),
    );
    assert_eq!(s, 422, "{v}");
    assert!(err_of(&v).contains("messages"), "{v}");

    // A 10 MB body: 413, named.
    let big = json!({"inputs": "a".repeat(10 * 1024 * 1024)});
    let (s, v) = post(&gen, &big);
    assert_eq!(s, 413, "{v}");
    assert!(err_of(&v).contains("too large"), "{v}");
    good(&server);

    // Unknown route.
    let (s, _) = post(&format!("{}/nope", server.url), &json!({}));
    assert_eq!(s, 404);

    // A client that disconnects mid-stream frees its slot at once.
    let before = server.metric("lorq_request_cancelled");
    let addr = server.url.trim_start_matches("http://").to_string();
    let body = json!({"inputs": "hello", "parameters": {"max_new_tokens": 3000, "ignore_eos_token": true}})
        .to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        sock,
        "POST /generate_stream HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    drop(sock);
    let start = Instant::now();
    while server.metric("lorq_request_cancelled") <= before {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the cancelled stream was not freed: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.metric("lorq_running_requests"), 0.0);
    good(&server);

    // Failed adapter loads are counted, and a fixed folder is not needed for others to work.
    assert!(server.metric("lorq_adapter_loads{outcome=\"error\"}") >= 2.0);
    let log = server.log();
    assert!(
        log.contains("request done"),
        "no per-request log line: {log}"
    );
}

#[test]
fn overload_auth_and_graceful_shutdown() {
    let mut server = Server::start(
        &fixture("llama/base"),
        &[
            "--max-concurrent-requests",
            "1",
            "--api-key",
            "s3cret",
            "--max-total-tokens",
            "4096",
            "--max-batch-total-tokens",
            "8192",
            "--shutdown-timeout-s",
            "60",
        ],
    );
    let url = server.url.clone();
    // Auth: /health is open, everything else needs the key.
    assert_eq!(
        http().get(format!("{url}/health")).send().unwrap().status(),
        200
    );
    let r = http().get(format!("{url}/info")).send().unwrap();
    assert_eq!(r.status(), 401);
    let r = http()
        .get(format!("{url}/info"))
        .bearer_auth("wrong")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().unwrap();
    assert!(err_of(&v).contains("wrong"), "{v}");
    let r = http()
        .get(format!("{url}/info"))
        .bearer_auth("s3cret")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    // One long stream holds the only slot: the next request gets 429 overloaded.
    let long = json!({"inputs": "hello", "parameters": {"max_new_tokens": 1500, "ignore_eos_token": true}});
    let url2 = url.clone();
    let body = long.clone();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let streamer = std::thread::spawn(move || {
        let mut r = http()
            .post(format!("{url2}/generate_stream"))
            .bearer_auth("s3cret")
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        // The first event: the request holds its slot now.
        let mut first = [0u8; 16];
        let n = r.read(&mut first).unwrap();
        started_tx.send(()).unwrap();
        let mut text = String::from_utf8_lossy(&first[..n]).into_owned();
        r.read_to_string(&mut text).unwrap();
        let last = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("data:"))
            .unwrap()
            .trim()
            .to_string();
        serde_json::from_str::<Value>(&last).unwrap()
    });
    started_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let start = Instant::now();
    loop {
        let r = http()
            .post(format!("{url}/generate"))
            .bearer_auth("s3cret")
            .json(&json!({"inputs": "hi", "parameters": {"max_new_tokens": 2}}))
            .send()
            .unwrap();
        if r.status() == 429 {
            let v: Value = r.json().unwrap();
            assert_eq!(v["error_type"], "overloaded", "{v}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never overloaded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGTERM while the stream runs: it still completes, then the process exits cleanly.
    server.terminate();
    let last = streamer.join().unwrap();
    assert_eq!(last["details"], Value::Null);
    assert!(last["generated_text"].is_string(), "{last}");
    assert!(
        server.wait_exit(Duration::from_secs(60)),
        "{}",
        server.log()
    );
    assert!(
        http().get(format!("{url}/health")).send().is_err(),
        "still accepting after shutdown"
    );
}

#[test]
fn streams_and_lists_follow_the_wire_formats() {
    let root = adapter_root();
    let server = Server::start(
        &fixture("llama/base"),
        &["--adapter-dir", root.path().to_str().unwrap()],
    );
    let url = &server.url;
    // POST / without stream: a JSON list (the clients index [0]).
    let (s, v) = post(
        url,
        &json!({"inputs": "hello", "parameters": {"max_new_tokens": 4, "details": true, "decoder_input_details": true, "return_k_alternatives": 2}, "stream": false}),
    );
    assert_eq!(s, 200, "{v}");
    let r = &v.as_array().expect("a list")[0];
    let d = &r["details"];
    assert_eq!(d["generated_tokens"], 4);
    assert_eq!(d["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(d["finish_reason"], "length");
    let prefill = d["prefill"].as_array().unwrap();
    assert_eq!(prefill.len(), d["prompt_tokens"].as_u64().unwrap() as usize);
    assert!(prefill[0]["logprob"].is_null());
    for t in d["tokens"].as_array().unwrap() {
        let alts = t["alternative_tokens"].as_array().unwrap();
        assert_eq!(alts.len(), 2);
        // Greedy: the chosen token is the best alternative.
        assert_eq!(alts[0]["id"], t["id"]);
    }
    // The native stream has no [DONE]; the last event carries the text.
    let (s, events) = post_sse(
        url,
        &json!({"inputs": "hello", "parameters": {"max_new_tokens": 4, "details": true}, "stream": true}),
    );
    assert_eq!(s, 200);
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(events.iter().all(|e| e != "[DONE]"));
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    let pieces: String = events
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["token"]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(last["generated_text"].as_str().unwrap(), pieces);
    assert_eq!(r["generated_text"].as_str().unwrap(), pieces);
    assert_eq!(last["details"]["generated_tokens"], 4);
    // apply_chat_template renders `inputs` as a user turn, as the chat route renders messages.
    let (s, v) = post(
        &format!("{url}/generate"),
        &json!({"inputs": "hello", "parameters": {"max_new_tokens": 4, "apply_chat_template": true}}),
    );
    assert_eq!(s, 200, "{v}");
    let (s, c) = post(
        &format!("{url}/v1/chat/completions"),
        &json!({"model": "", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0.0}),
    );
    assert_eq!(s, 200, "{c}");
    assert_eq!(v["generated_text"], c["choices"][0]["message"]["content"]);
    assert_eq!(c["usage"]["completion_tokens"], 4);
    // The OpenAI stream ends with [DONE].
    let (s, events) = post_sse(
        &format!("{url}/v1/completions"),
        &json!({"model": "org/a", "prompt": "hello", "max_tokens": 3, "stream": true}),
    );
    assert_eq!(s, 200);
    assert_eq!(events.last().unwrap(), "[DONE]");
    // /v1/models lists the base and the adapters loaded so far; lifecycle routes.
    let v: Value = http()
        .get(format!("{url}/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"base") && ids.contains(&"org/a"), "{ids:?}");
    let (s, v) = post(
        &format!("{url}/v1/load_lora_adapter"),
        &json!({"lora_name": "alias", "lora_path": "org/a"}),
    );
    assert_eq!(s, 200, "{v}");
    let v: Value = http()
        .get(format!("{url}/v1/lora_adapters"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(
        v["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == "alias"),
        "{v}"
    );
    let (s, _) = post(
        &format!("{url}/v1/unload_lora_adapter"),
        &json!({"lora_name": "alias"}),
    );
    assert_eq!(s, 200);
    let (s, _) = post(
        &format!("{url}/v1/unload_lora_adapter"),
        &json!({"lora_name": "alias"}),
    );
    assert_eq!(s, 404);
    // /tokenize and /metrics.
    let (s, v) = post(
        &format!("{url}/tokenize"),
        &json!({"inputs": "hello world"}),
    );
    assert_eq!(s, 200);
    let toks = v.as_array().unwrap();
    assert!(!toks.is_empty());
    assert_eq!(toks.last().unwrap()["stop"], 11);
    let m = http()
        .get(format!("{url}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for series in [
        "lorq_request_count{adapter=\"base\"}",
        "lorq_request_count{adapter=\"org/a\"}",
        "lorq_request_time_to_first_token_seconds_bucket",
        "lorq_request_queue_duration_seconds_bucket",
        "lorq_request_time_per_output_token_seconds_bucket",
        "lorq_queue_size",
        "lorq_batch_size_bucket",
        "lorq_tokens_per_second",
        "lorq_adapter_tokens_per_second{adapter=\"org/a\"}",
    ] {
        assert!(m.contains(series), "/metrics lacks {series}:\n{m}");
    }
}

/// The adapter cache: a device tier that holds 1.5 adapters and a host tier that holds 1.5.
/// Using a, b, c in turn leaves c on the device, b in host RAM and a dropped; using b again
/// moves it up without reading the disk; a comes back from disk.
#[test]
fn adapter_cache_moves_adapters_down_a_tier_then_out() {
    let root = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama/adapters/r8-all");
    for id in ["t/a", "t/b", "t/c"] {
        copy_dir(&src, &root.path().join(id));
    }
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let size: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
    let budget = (size * 3 / 2).to_string();
    let server = Server::start(
        &fixture("llama/base"),
        &[
            "--adapter-dir",
            root.path().to_str().unwrap(),
            "--adapter-device-memory",
            &budget,
            "--adapter-host-memory",
            &budget,
        ],
    );
    let use_adapter = |id: &str| {
        let (s, v) = post(
            &format!("{}/generate", server.url),
            &json!({"inputs": "hi", "parameters": {"adapter_id": id, "max_new_tokens": 1}}),
        );
        assert_eq!(s, 200, "{v}");
    };
    let tiers = || -> Vec<(String, String)> {
        let v: Value = http()
            .get(format!("{}/v1/lora_adapters", server.url))
            .send()
            .unwrap()
            .json()
            .unwrap();
        v["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                assert_eq!(a["bytes"].as_u64().unwrap() as usize, size, "{a}");
                (
                    a["id"].as_str().unwrap().to_string(),
                    a["tier"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    use_adapter("t/a");
    use_adapter("t/b");
    assert_eq!(tiers(), vec![pair("t/a", "host"), pair("t/b", "device")]);
    use_adapter("t/c");
    assert_eq!(tiers(), vec![pair("t/b", "host"), pair("t/c", "device")]);
    use_adapter("t/b");
    assert_eq!(tiers(), vec![pair("t/b", "device"), pair("t/c", "host")]);
    assert_eq!(server.metric("lorq_adapter_loads{outcome=\"ok\"}"), 3.0);
    use_adapter("t/a");
    assert_eq!(server.metric("lorq_adapter_loads{outcome=\"ok\"}"), 4.0);
    assert_eq!(server.metric("lorq_adapter_evictions{from=\"host\"}"), 2.0);
}
