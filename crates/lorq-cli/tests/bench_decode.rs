//! `lorq bench decode` end to end on the tiny random shape on the CPU: the report's rows and the
//! bytes a step reads (weights, KV, the adapters in use), never speed.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn bench_decode_reports_the_bytes_and_the_byte_ceiling_of_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decode.json");
    let (_, v) = lorq_report(
        &[
            "bench",
            "decode",
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--dtype",
            "f32",
            "--batch-sizes",
            "1,3",
            "--adapters",
            "0,2",
            "--rank",
            "4",
            "--context",
            "8",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
        ],
        &path,
    );
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "2 adapter counts x 2 batch sizes: {rows:?}");
    let row = |adapters: u64, batch: u64| {
        rows.iter()
            .find(|r| r["adapters"] == adapters && r["batch"] == batch)
            .unwrap_or_else(|| panic!("no row for {adapters} adapters at batch {batch}"))
    };
    let f = |r: &Value, key: &str| {
        r[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {r}"))
    };
    for batch in [1, 3] {
        let base = row(0, batch);
        let with = row(2, batch);
        assert!(f(base, "tokens_per_s") > 0.0 && f(with, "tokens_per_s") > 0.0);
        assert_eq!(f(base, "adapter_bytes_per_step"), 0.0);
        assert_eq!(f(base, "byte_ceiling_pct_of_no_adapter"), 100.0);
        // The same weights and KV with or without adapters; the adapters add their own bytes.
        assert_eq!(f(base, "kv_bytes_per_step"), f(with, "kv_bytes_per_step"));
        let adapter_bytes = f(with, "adapter_bytes_per_step");
        assert!(adapter_bytes > 0.0, "{with}");
        assert_eq!(
            f(with, "bytes_per_step"),
            f(base, "bytes_per_step") + adapter_bytes,
            "{with}"
        );
        let ceiling = f(with, "byte_ceiling_pct_of_no_adapter");
        let expected = 100.0 * f(base, "bytes_per_step") / f(with, "bytes_per_step");
        assert!(
            (ceiling - expected).abs() < 1e-9 && ceiling < 100.0,
            "{with}"
        );
    }
    // Batch 1 uses one of the two adapters, batch 3 both (round-robin over the rows).
    let one = f(row(2, 1), "adapter_bytes_per_step");
    assert_eq!(f(row(2, 3), "adapter_bytes_per_step"), 2.0 * one);
}

#[test]
fn bench_decode_samples_when_asked_and_names_a_bad_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decode.json");
    let (_, v) = lorq_report(
        &[
            "bench",
            "decode",
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--dtype",
            "f32",
            "--batch-sizes",
            "2",
            "--context",
            "4",
            "--new-tokens",
            "3",
            "--repeats",
            "1",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--repetition-penalty",
            "1.2",
            "--compare-host-picks",
        ],
        &path,
    );
    let rows = v["rows"].as_array().unwrap();
    // On the CPU every pick is the host's: the comparison adds no row.
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        rows[0]["sampling"]["temperature"].as_f64(),
        Some(0.8f32 as f64)
    );
    assert_eq!(rows[0]["sampling"]["top_p"].as_f64(), Some(0.9f32 as f64));
    assert_eq!(
        rows[0]["sampling"]["repetition_penalty"].as_f64(),
        Some(1.2f32 as f64)
    );
    assert!(rows[0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    let e = lorq_fails(&[
        "bench",
        "decode",
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--batch-sizes",
        "1",
        "--context",
        "2",
        "--new-tokens",
        "1",
        "--top-p",
        "1.5",
    ]);
    assert!(e.contains("top_p must be in (0, 1], got 1.5"), "{e}");
}
