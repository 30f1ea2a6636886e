use std::path::PathBuf;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::test_validator::validate;
use super::{JsonConstraint, JsonSchema, TokenPieces};
use crate::tokenizer::Tokenizer;

/// A small vocabulary: every printable ASCII character, some multi-character JSON pieces,
/// non-ASCII text, one unusable token and EOS (the last id).
fn synthetic() -> (Arc<TokenPieces>, u32) {
    let mut pieces: Vec<Option<String>> = (0x20u8..0x7f)
        .map(|b| Some((b as char).to_string()))
        .collect();
    for p in [
        "{\"", "\":", "\",", "\"}", "\"]", "\",\"", "true", "false", "null", "nul", "12", "-1",
        "0.", ".5", "e+", "E-9", "abc", "ab", "a\"", "é", "日本", "\\n", "\\u00", "\\ud8", "e9",
        "ff", "}]", "],", "{}", "[]", "[{", "}}", "\"\"", "1}", "3,", "\n", "\t", "  ", "😀",
        "x\"}", "\":\"", "\":[", "\":{", "kids", "\"v", "tags", "name", "age",
    ] {
        pieces.push(Some(p.to_string()));
    }
    pieces.push(None);
    pieces.push(None); // EOS
    let eos = pieces.len() as u32 - 1;
    (Arc::new(TokenPieces::from_pieces(pieces)), eos)
}

fn id_of(pieces: &TokenPieces, piece: &str) -> u32 {
    (0..pieces.len() as u32)
        .find(|&i| pieces.piece(i) == Some(piece))
        .unwrap_or_else(|| panic!("no token {piece:?}"))
}

fn schemas() -> Vec<(&'static str, Option<Value>)> {
    vec![
        ("json_object", None),
        (
            "string_or_enum",
            Some(json!({"anyOf": [
                {"type": "string", "maxLength": 4},
                {"enum": ["abc", "a\"b", 1]}
            ]})),
        ),
        (
            "escaped_key",
            Some(
                json!({"type": "object", "properties": {"q\"k\\": {"type": "null"}, "é": {"type": "boolean"}}}),
            ),
        ),
        (
            "person",
            Some(json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 5},
                    "age": {"type": "integer"},
                    "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "ab"]},
                             "minItems": 1, "maxItems": 3},
                    "ok": {"type": "boolean"},
                    "n": {"type": "null"},
                    "score": {"type": "number"}
                },
                "required": ["name", "age"]
            })),
        ),
        (
            "numbers",
            Some(json!({"type": "array", "items": {"type": "number"}, "maxItems": 4})),
        ),
        (
            "any_of",
            Some(json!({"anyOf": [
                {"type": "integer"},
                {"type": "string", "maxLength": 3},
                {"const": {"k": [1, 2]}}
            ]})),
        ),
        ("nullable", Some(json!({"type": ["string", "null"]}))),
        (
            "ref",
            Some(json!({
                "$defs": {"tag": {"type": "string", "enum": ["a", "abc"]}},
                "type": "object",
                "properties": {"t": {"$ref": "#/$defs/tag"}, "u": {"$ref": "#/$defs/tag"}},
                "required": ["u"]
            })),
        ),
        (
            "recursive",
            Some(json!({
                "definitions": {"node": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/definitions/node"}, "maxItems": 2}
                    },
                    "required": ["v"]
                }},
                "$ref": "#/definitions/node"
            })),
        ),
        ("number", Some(json!({"type": "number"}))),
        ("any", Some(json!({}))),
        (
            "enum",
            Some(json!({"enum": [1, "a", null, true, [1], {"b": 2}, 12.5, "日本", {"é": "😀"}]})),
        ),
        (
            "one_of",
            Some(json!({"oneOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                 "additionalProperties": false},
                {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"],
                 "additionalProperties": false}
            ]})),
        ),
        (
            "free_ints",
            Some(json!({"type": "object", "additionalProperties": {"type": "integer"}})),
        ),
        (
            "empty_only",
            Some(json!({"type": "object", "additionalProperties": false})),
        ),
        (
            "escapes",
            Some(
                json!({"type": "array", "items": {"type": "string", "maxLength": 2}, "minItems": 2}),
            ),
        ),
    ]
}

/// Picks random allowed tokens (half the time one that closes something, to finish) until EOS
/// or `max` tokens. With `check_all`, every step also checks the mask against `advance` on
/// every token. Returns the text and whether it ended with EOS.
fn random_walk(
    c: &mut JsonConstraint,
    pieces: &TokenPieces,
    eos: u32,
    rng: &mut StdRng,
    check_all: usize,
    max: usize,
) -> (String, bool) {
    let mut text = String::new();
    for step in 0..max {
        let mut logits = vec![0.0f32; pieces.len()];
        c.mask_logits(&mut logits, &[eos]);
        let allowed: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        assert!(!allowed.is_empty(), "dead end after {text:?}");
        assert_eq!(
            logits[eos as usize].is_finite(),
            c.is_complete(),
            "EOS allowed iff complete, after {text:?}"
        );
        if c.is_finished() {
            assert_eq!(allowed, vec![eos], "only EOS after the complete {text:?}");
        }
        if step < check_all {
            for id in 0..pieces.len() as u32 {
                if id == eos {
                    continue;
                }
                let ok = c.clone().advance(id).is_ok();
                assert_eq!(
                    ok,
                    logits[id as usize].is_finite(),
                    "mask and advance disagree on token {id} ({:?}) after {text:?}",
                    pieces.piece(id)
                );
            }
        }
        let closers: Vec<u32> = allowed
            .iter()
            .copied()
            .filter(|&i| i == eos || pieces.piece(i).is_some_and(|p| p.contains(['"', '}', ']'])))
            .collect();
        let pick = if !closers.is_empty() && rng.random_bool(0.5) {
            closers[rng.random_range(0..closers.len())]
        } else {
            allowed[rng.random_range(0..allowed.len())]
        };
        if pick == eos {
            assert!(c.is_complete());
            return (text, true);
        }
        c.advance(pick)
            .unwrap_or_else(|e| panic!("allowed token {pick} refused: {e}"));
        text.push_str(pieces.piece(pick).unwrap());
        assert_eq!(c.text(), text);
    }
    (text, false)
}

fn check_walks(pieces: &Arc<TokenPieces>, eos: u32, walks: usize, check_all: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (name, schema) in schemas() {
        let compiled = Arc::new(JsonSchema::compile(schema.as_ref()).unwrap());
        let as_value = schema.clone().unwrap_or(json!({"type": "object"}));
        let mut done = 0;
        for _ in 0..walks {
            let mut c = JsonConstraint::new(compiled.clone(), pieces.clone());
            let (text, complete) = random_walk(&mut c, pieces, eos, &mut rng, check_all, 300);
            if !complete {
                continue;
            }
            done += 1;
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{name}: {text:?} is not JSON: {e}"));
            if let Err(e) = validate(&as_value, &v, &as_value) {
                panic!("{name}: {text:?} does not match the schema: {e}");
            }
            assert!(
                !text.starts_with(char::is_whitespace),
                "{name}: {text:?} is not compact"
            );
        }
        assert!(
            done * 2 >= walks,
            "{name}: only {done} of {walks} walks finished"
        );
    }
}

#[test]
fn random_walks_give_valid_json_synthetic_vocab() {
    let (pieces, eos) = synthetic();
    check_walks(&pieces, eos, 40, 300, 7);
}

fn advance_all(c: &mut JsonConstraint, pieces: &TokenPieces, toks: &[&str]) {
    for t in toks {
        c.advance(id_of(pieces, t)).unwrap();
    }
}

fn allowed_pieces(c: &JsonConstraint, pieces: &TokenPieces, eos: u32) -> (Vec<String>, bool) {
    let mut logits = vec![1.0f32; pieces.len()];
    c.mask_logits(&mut logits, &[eos]);
    let ok = (0..pieces.len() as u32)
        .filter(|&i| logits[i as usize].is_finite() && i != eos)
        .map(|i| pieces.piece(i).unwrap().to_string())
        .collect();
    (ok, logits[eos as usize] == 1.0)
}

#[test]
fn integer_property_masks_letters_and_fractions() {
    let (pieces, eos) = synthetic();
    let schema = json!({"type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]});
    let schema = Arc::new(JsonSchema::compile(Some(&schema)).unwrap());
    let mut c = JsonConstraint::new(schema, pieces.clone());
    let (ok, eos_ok) = allowed_pieces(&c, &pieces, eos);
    assert!(ok.contains(&"{".to_string()) && ok.contains(&"{\"".to_string()));
    for bad in [" ", "\n", "[", "\"", "{}", "1"] {
        assert!(
            !ok.contains(&bad.to_string()),
            "{bad:?} allowed at the start"
        );
    }
    assert!(!eos_ok);
    advance_all(&mut c, &pieces, &["{\"", "a", "\":"]);
    let (ok, eos_ok) = allowed_pieces(&c, &pieces, eos);
    for good in ["1", "12", "-1", "-", "0", "1}"] {
        assert!(
            ok.contains(&good.to_string()),
            "{good:?} masked after {:?}",
            c.text()
        );
    }
    for bad in ["abc", "a", "x", "\"", "true", ".", ".5", "0.", "}", " "] {
        assert!(
            !ok.contains(&bad.to_string()),
            "{bad:?} allowed after {:?}",
            c.text()
        );
    }
    assert!(!eos_ok);
    advance_all(&mut c, &pieces, &["12"]);
    let (ok, _) = allowed_pieces(&c, &pieces, eos);
    for good in ["3", "}", ",", "\","] {
        // `",` is not a continuation: the string property needs `,"b":`.
        let expect = good != "\",";
        assert_eq!(
            ok.contains(&good.to_string()),
            expect,
            "{good:?} after {:?}",
            c.text()
        );
    }
    for bad in [".", "e", "E-9", "e+"] {
        assert!(
            !ok.contains(&bad.to_string()),
            "{bad:?} allowed after an integer"
        );
    }
    assert!(c.advance(id_of(&pieces, ".")).is_err());
    assert_eq!(
        c.text(),
        "{\"a\":12",
        "a refused token leaves the state unchanged"
    );
    advance_all(
        &mut c,
        &pieces,
        &[",", "\"", "b", "\":", "\"", "é", "\\n", "\"}"],
    );
    assert_eq!(c.text(), "{\"a\":12,\"b\":\"é\\n\"}");
    assert!(c.is_complete() && c.is_finished());
    let (ok, eos_ok) = allowed_pieces(&c, &pieces, eos);
    assert!(
        ok.is_empty() && eos_ok,
        "only EOS after a complete object, got {ok:?}"
    );
}

#[test]
fn eos_only_when_complete_and_top_level_numbers_end() {
    let (pieces, eos) = synthetic();
    let schema = Arc::new(JsonSchema::compile(Some(&json!({"type": "number"}))).unwrap());
    let mut c = JsonConstraint::new(schema, pieces.clone());
    assert!(!allowed_pieces(&c, &pieces, eos).1);
    advance_all(&mut c, &pieces, &["-"]);
    assert!(!c.is_complete() && !allowed_pieces(&c, &pieces, eos).1);
    advance_all(&mut c, &pieces, &["12"]);
    let (ok, eos_ok) = allowed_pieces(&c, &pieces, eos);
    assert!(c.is_complete() && eos_ok && !c.is_finished());
    assert!(ok.contains(&"3".to_string()) && ok.contains(&".5".to_string()));
    advance_all(&mut c, &pieces, &["."]);
    assert!(!c.is_complete() && !allowed_pieces(&c, &pieces, eos).1);
    advance_all(&mut c, &pieces, &["5", "E-9"]);
    assert!(c.is_complete());
    assert_eq!(c.text().parse::<f64>().unwrap(), -12.5e-9);
    // Leading zeros are not JSON.
    let schema = Arc::new(JsonSchema::compile(Some(&json!({"type": "integer"}))).unwrap());
    let mut c = JsonConstraint::new(schema, pieces.clone());
    advance_all(&mut c, &pieces, &["0"]);
    assert!(
        c.is_finished()
            || !allowed_pieces(&c, &pieces, eos)
                .0
                .contains(&"1".to_string())
    );
    // Strings: EOS only after the closing quote, minLength counts characters.
    let s = json!({"type": "string", "minLength": 2, "maxLength": 3});
    let schema = Arc::new(JsonSchema::compile(Some(&s)).unwrap());
    let mut c = JsonConstraint::new(schema, pieces.clone());
    advance_all(&mut c, &pieces, &["\"", "é"]);
    let (ok, eos_ok) = allowed_pieces(&c, &pieces, eos);
    assert!(!eos_ok && !ok.contains(&"\"".to_string()) && ok.contains(&"ab".to_string()));
    assert!(!ok.contains(&"abc".to_string()), "maxLength 3 exceeded");
    advance_all(&mut c, &pieces, &["\\n", "a\""]);
    assert!(c.is_finished());
}

#[test]
fn enum_strings_and_keys_are_exact() {
    let (pieces, eos) = synthetic();
    let s = json!({"type": "object", "properties": {"kind": {"enum": ["ab", "abc"]}}, "required": ["kind"]});
    let schema = Arc::new(JsonSchema::compile(Some(&s)).unwrap());
    let mut c = JsonConstraint::new(schema, pieces.clone());
    advance_all(&mut c, &pieces, &["{\""]);
    let (ok, _) = allowed_pieces(&c, &pieces, eos);
    assert_eq!(ok, vec!["k".to_string()]);
    assert!(c.advance(id_of(&pieces, "kids")).is_err());
    advance_all(&mut c, &pieces, &["k", "i", "n", "d", "\":", "\"", "ab"]);
    let (ok, _) = allowed_pieces(&c, &pieces, eos);
    let mut ok = ok;
    ok.sort();
    assert_eq!(
        ok,
        vec!["\"".to_string(), "\"}".to_string(), "c".to_string()]
    );
}

#[test]
fn bad_schemas_are_clear_errors() {
    let cases = [
        (json!({"type": "strin"}), "unknown `type` \"strin\""),
        (
            json!({"type": "object", "properties": {"a": {}}, "required": ["a", "zz"]}),
            "`required` names \"zz\"",
        ),
        (
            json!({"type": "array", "minItems": 3, "maxItems": 2}),
            "`minItems` 3 is greater",
        ),
        (
            json!({"type": "string", "minLength": 3, "maxLength": 2}),
            "`minLength` 3",
        ),
        (
            json!({"type": "object", "patternProperties": {"^a": {}}}),
            "keyword `patternProperties` is not supported",
        ),
        (
            json!({"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}),
            "#/properties/d`: keyword `format`",
        ),
        (
            json!({"type": "string", "pattern": "a+"}),
            "keyword `pattern`",
        ),
        (json!({"$ref": "#/$defs/missing"}), "points to nothing"),
        (
            json!({"$ref": "http://example.org/s.json"}),
            "only references inside the schema",
        ),
        (
            json!({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}, "$ref": "#/$defs/a"}),
            "left recursion",
        ),
        (json!(false), "matches no value"),
        (
            json!({"type": "integer", "enum": [1, "x"]}),
            "`enum` value \"x\"",
        ),
        (json!({"type": "array", "items": [{}, {}]}), "tuple"),
        (
            json!({"type": "array", "maxItems": -1}),
            "`maxItems` must be a non-negative integer",
        ),
        (json!({"type": 3}), "`type` must be"),
        (json!({"anyOf": []}), "`anyOf` must be a non-empty array"),
        (
            json!({"type": "string", "anyOf": [{"maxLength": 2}]}),
            "together with `anyOf`",
        ),
        (json!(3), "must be an object or a boolean"),
    ];
    for (schema, want) in cases {
        match JsonSchema::compile(Some(&schema)) {
            Ok(_) => panic!("{schema} compiled"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(want),
                    "{schema}: {msg:?} does not say {want:?}"
                );
            }
        }
    }
}

#[test]
fn unusable_tokens_are_refused() {
    let (pieces, eos) = synthetic();
    let schema = Arc::new(JsonSchema::compile(None).unwrap());
    let mut c = JsonConstraint::new(schema, pieces.clone());
    let err = c.advance(eos).unwrap_err().to_string();
    assert!(err.contains("no usable text"), "{err}");
    assert!(c.advance(pieces.len() as u32 + 5).is_err());
    let mut logits = vec![0.0f32; pieces.len() + 10];
    c.mask_logits(&mut logits, &[eos]);
    assert!(logits[pieces.len()..]
        .iter()
        .all(|l| *l == f32::NEG_INFINITY));
}

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// Real tokenizers: pieces of an encoding concatenate to its decoding, and random walks stay
/// valid, with the mask checked against `advance` on every token for the first steps.
fn real_tokenizer(dir: &std::path::Path, walks: usize, check_all: usize) {
    let tok = Tokenizer::load(dir).unwrap();
    let pieces = Arc::new(TokenPieces::new(&tok).unwrap());
    for text in [
        "{\"name\":\"Zoë\",\"n\":[1,2.5e-3]}",
        "{\"a\": \"b c\"}",
        " hello world",
    ] {
        let ids = tok.encode(text).unwrap();
        let decoded = tok.decode(&ids, false).unwrap();
        match ids
            .iter()
            .map(|&i| pieces.piece(i))
            .collect::<Option<String>>()
        {
            Some(joined) => assert_eq!(joined, decoded, "pieces of {text:?}"),
            // A character split over byte tokens: those tokens are unusable on their own.
            None => assert!(
                !decoded.is_ascii(),
                "an ASCII token of {text:?} is unusable"
            ),
        }
    }
    let eos = tok
        .eos_token
        .as_deref()
        .and_then(|t| tok.token_to_id(t))
        .expect("eos token");
    assert!(
        pieces.piece(eos).is_none(),
        "EOS must not be usable inside JSON"
    );
    assert!(pieces.usable() > pieces.len() / 2);
    check_walks(&pieces, eos, walks, check_all, 11);
}

#[test]
fn real_tokenizer_tiny_llama() {
    real_tokenizer(&fixture("fixtures/llama/base"), 12, 300);
}

#[test]
fn real_tokenizer_tiny_smollm2() {
    real_tokenizer(&fixture("fixtures/smollm2/tiny/expected"), 12, 300);
}

/// The full SmolLM2 tokenizer (49152 tokens), when the default model is cached.
#[test]
fn real_tokenizer_smollm2_if_cached() {
    let dir = crate::pull::default_model_dir();
    if !dir.join("tokenizer.json").exists() {
        eprintln!("skipped: no cached default model");
        return;
    }
    real_tokenizer(&dir, 6, 2);
}

/// Mask time on the full SmolLM2 vocabulary in a few typical states (run in release with
/// `--ignored --nocapture`).
#[test]
#[ignore = "timing benchmark on the full SmolLM2 vocabulary: run in release with --ignored --nocapture"]
fn mask_timing_smollm2() {
    let dir = crate::pull::default_model_dir();
    let tok = Tokenizer::load(&dir).unwrap();
    let t0 = std::time::Instant::now();
    let pieces = Arc::new(TokenPieces::new(&tok).unwrap());
    eprintln!(
        "TokenPieces::new: {:?} for {} tokens",
        t0.elapsed(),
        pieces.len()
    );
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name"]});
    for (what, schema, prefix) in [
        ("start", Some(schema.clone()), ""),
        ("inside a string", Some(schema.clone()), "{\"name\":\"Jo"),
        ("integer", Some(schema.clone()), "{\"age\":3"),
        ("free object key", None, "{\"ab"),
        ("any value", None, "{\"a\":"),
        (
            "string or enum",
            Some(json!({"anyOf": [{"type": "string"}, {"enum": ["Joseph", "Jo\"", 1]}]})),
            "\"Jo",
        ),
    ] {
        let compiled = Arc::new(JsonSchema::compile(schema.as_ref()).unwrap());
        let mut c = JsonConstraint::new(compiled, pieces.clone());
        for ch in prefix.chars() {
            let id = (0..pieces.len() as u32)
                .find(|&i| pieces.piece(i) == Some(ch.to_string().as_str()))
                .unwrap();
            c.advance(id).unwrap();
        }
        let mut logits = vec![0.0f32; pieces.len()];
        let n = 50;
        let t = std::time::Instant::now();
        for _ in 0..n {
            c.mask_logits(&mut logits, &[0]);
        }
        let allowed = logits.iter().filter(|l| l.is_finite()).count();
        eprintln!("{what}: {:?} per mask, {allowed} allowed", t.elapsed() / n);
    }
}

#[test]
fn constraint_is_send() {
    fn send<T: Send>() {}
    send::<JsonConstraint>();
    send::<Arc<JsonSchema>>();
    send::<Arc<TokenPieces>>();
}

/// A SentencePiece-style tokenizer (Metaspace `▁`, byte fallback, a decoder that strips the
/// first leading space): pieces keep their leading space, byte tokens are unusable.
#[test]
fn sentencepiece_style_pieces() {
    let vocab = json!({
        "<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5, "{": 6, "}": 7, "\"": 8,
        ":": 9, "▁a": 10, "<0xC3>": 11, "<0xA9>": 12, "▁{": 13, "ab": 14, "1": 15
    });
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocab,
            "merges": ["▁ a", "▁ {", "a b"]}
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"eos_token": "</s>", "bos_token": "<s>"}).to_string(),
    )
    .unwrap();
    let tok = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(
        tok.decode(&[10], false).unwrap(),
        "a",
        "the decoder strips the first space"
    );
    let pieces = TokenPieces::new(&tok).unwrap();
    let want: [(u32, Option<&str>); 13] = [
        (0, None),
        (1, None),
        (2, None),
        (3, Some(" ")),
        (4, Some("a")),
        (6, Some("{")),
        (8, Some("\"")),
        (10, Some(" a")),
        (11, None),
        (12, None),
        (13, Some(" {")),
        (14, Some("ab")),
        (15, Some("1")),
    ];
    for (id, piece) in want {
        assert_eq!(pieces.piece(id), piece, "token {id}");
    }
    // Compact JSON: a leading space is never allowed.
    let schema = Arc::new(JsonSchema::compile(None).unwrap());
    let c = JsonConstraint::new(schema, Arc::new(pieces));
    let allowed = c.allowed();
    assert!(allowed[6] && !allowed[13] && !allowed[3] && !allowed[10]);
}

/// A non-ASCII key or enum character may be spelled raw or as its `\u` escape(s), mixed.
#[test]
fn non_ascii_literals_accept_escapes() {
    let (pieces, eos) = synthetic();
    let s = json!({"type": "object", "properties": {"é": {"enum": ["😀x"]}}, "required": ["é"]});
    let schema = Arc::new(JsonSchema::compile(Some(&s)).unwrap());
    let mut c = JsonConstraint::new(schema.clone(), pieces.clone());
    advance_all(
        &mut c,
        &pieces,
        &["{\"", "\\u00", "E", "9", "\":", "\"", "\\", "u", "d", "8"],
    );
    assert!(
        c.advance(id_of(&pieces, "3")).is_ok(),
        "\\ud83d is the high surrogate of 😀"
    );
    for t in ["d", "\\", "u", "d", "e", "0", "0", "x", "\"}"] {
        c.advance(id_of(&pieces, t)).unwrap();
    }
    assert!(c.is_finished());
    let v: Value = serde_json::from_str(c.text()).unwrap();
    assert_eq!(v, json!({"é": "😀x"}));
    let mut c = JsonConstraint::new(schema, pieces.clone());
    advance_all(&mut c, &pieces, &["{\"", "é", "\":", "\""]);
    assert!(c.advance(id_of(&pieces, "\\ud8")).is_ok());
    assert!(!allowed_pieces(&c, &pieces, eos)
        .0
        .contains(&"4".to_string()));
}
