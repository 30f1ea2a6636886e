//! Peer rows (a JSON report of `scripts/bench/torch_matmul.py`, `torch_scaled_mm.py` or
//! `peer_quant_kernels.py`, timed on the same card in the same call) merged into a GPU kernel
//! report, each with its speedup over lorq's bf16 baseline row of the same shape and rows.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// Appends the `rows` of the peer report at `path` to `rows`. A peer row whose `(n, k, m)` has a
/// baseline row (`is_base`) gets `speedup_vs_bf16` (wall times), `speedup_vs_bf16_graph` (where
/// both have a graph-replayed `us_graph`) and the baseline's `shape` label.
// Only the CUDA build's bench commands merge peers; the CPU build keeps it for its unit test.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn merge_peer_rows(
    path: &Path,
    rows: &mut Vec<Value>,
    is_base: impl Fn(&Value) -> bool,
) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let peer: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON report", path.display()))?;
    let Some(peer_rows) = peer["rows"].as_array() else {
        anyhow::bail!("{}: no \"rows\" array", path.display());
    };
    for r in peer_rows {
        let mut r = r.clone();
        let base = rows
            .iter()
            .find(|b| is_base(b) && b["n"] == r["n"] && b["k"] == r["k"] && b["m"] == r["m"]);
        if let (Some(b), Some(us)) = (base, r["us"].as_f64()) {
            r["speedup_vs_bf16"] = json!(b["us"].as_f64().unwrap_or(f64::NAN) / us);
            r["shape"] = b["shape"].clone();
            if let (Some(bg), Some(ug)) = (b["us_graph"].as_f64(), r["us_graph"].as_f64()) {
                r["speedup_vs_bf16_graph"] = json!(bg / ug);
            }
        }
        rows.push(r);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
        let p = dir.path().join("peer.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn peer_rows_get_the_baselines_speedups_and_shape() {
        let dir = tempfile::tempdir().unwrap();
        let p = report(
            &dir,
            r#"{"rows": [
                {"format": "nf4", "peer": "bitsandbytes", "n": 8, "k": 16, "m": 1, "us": 20.0, "us_graph": 10.0},
                {"format": "int8", "peer": "bitsandbytes", "n": 8, "k": 16, "m": 1, "us": 40.0, "us_graph": null},
                {"format": "nf4", "peer": "bitsandbytes", "n": 8, "k": 16, "m": 2, "us": 5.0}
            ]}"#,
        );
        let mut rows = vec![
            json!({"format": "bf16", "path": "cublas", "shape": "8x16 (t)", "n": 8, "k": 16, "m": 1, "us": 30.0, "us_graph": 15.0}),
            json!({"format": "nf4", "path": "auto", "shape": "8x16 (t)", "n": 8, "k": 16, "m": 1, "us": 3.0}),
        ];
        merge_peer_rows(&p, &mut rows, |b| b["format"] == "bf16").unwrap();
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[2]["speedup_vs_bf16"], json!(1.5));
        assert_eq!(rows[2]["speedup_vs_bf16_graph"], json!(1.5));
        assert_eq!(rows[2]["shape"], json!("8x16 (t)"));
        // No graph time on the peer's side: no graph speedup.
        assert_eq!(rows[3]["speedup_vs_bf16"], json!(0.75));
        assert!(rows[3].get("speedup_vs_bf16_graph").is_none());
        // No baseline for m = 2: kept, without speedups.
        assert!(rows[4].get("speedup_vs_bf16").is_none());
        assert_eq!(rows[4]["us"], json!(5.0));
    }

    #[test]
    fn bad_peer_reports_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let mut rows = Vec::new();
        let p = report(&dir, r#"{"card": "x"}"#);
        let e = merge_peer_rows(&p, &mut rows, |_| true).unwrap_err();
        assert!(format!("{e:#}").contains("no \"rows\" array"), "{e:#}");
        let p = report(&dir, "not json");
        let e = merge_peer_rows(&p, &mut rows, |_| true).unwrap_err();
        assert!(format!("{e:#}").contains("not a JSON report"), "{e:#}");
        let e = merge_peer_rows(&dir.path().join("missing.json"), &mut rows, |_| true).unwrap_err();
        assert!(format!("{e:#}").contains("missing.json"), "{e:#}");
    }
}
