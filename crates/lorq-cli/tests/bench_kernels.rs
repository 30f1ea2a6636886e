//! `lorq bench kernels` end to end on a tiny shape: a correctness test of the report (every
//! format present, finite timings, fused kernels within their error bounds), never of speed.

mod common;

use common::*;

#[test]
fn bench_kernels_reports_every_jit_method_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kernels.json");
    let (stdout, v) = lorq_report(
        &[
            "bench",
            "kernels",
            "--shapes",
            "64x128",
            "--m",
            "1,5",
            "--repeats",
            "1",
        ],
        &path,
    );
    assert!(stdout.contains("| format |"), "no table: {stdout}");
    assert!(
        v["card"].as_str().unwrap().starts_with("cpu: "),
        "{}",
        v["card"]
    );
    assert_eq!(v["date"].as_str().unwrap().len(), 10);
    let cmd = v["command"].as_str().unwrap();
    assert!(cmd.contains("bench kernels --shapes 64x128"), "{cmd}");
    assert!(
        !cmd.contains(dir.path().to_str().unwrap()),
        "absolute path in {cmd}"
    );
    let rows = v["rows"].as_array().unwrap();

    let jit = [
        "bitsandbytes",
        "bitsandbytes-nf4",
        "bitsandbytes-fp4",
        "eetq",
        "hqq-4bit",
        "hqq-3bit",
        "hqq-2bit",
        "fp8",
    ];
    let mut formats: Vec<String> = vec!["f32".into(), "bf16".into()];
    for m in jit {
        formats.push(m.into());
        formats.push(format!("{m} (dequantize+matmul)"));
    }
    for f in &formats {
        for m in [1, 5] {
            let r = rows
                .iter()
                .find(|r| r["format"] == f.as_str() && r["m"] == m)
                .unwrap_or_else(|| panic!("no row for {f} m={m}"));
            assert_eq!(r["shape"], serde_json::json!([64, 128]), "{r}");
            for key in [
                "us",
                "speedup_vs_bf16",
                "speedup_vs_f32",
                "gbps",
                "max_rel_err",
            ] {
                let x = r[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{f} m={m}: {key} missing"));
                assert!(x.is_finite() && x >= 0.0, "{f} m={m}: {key} = {x}");
            }
            assert!(r["us"].as_f64().unwrap() > 0.0, "{r}");
            let bound = if f == "bitsandbytes" || f == "bf16" {
                2e-2
            } else {
                1e-4
            };
            let e = r["max_rel_err"].as_f64().unwrap();
            assert!(e <= bound, "{f} m={m}: max_rel_err {e} > {bound}");
        }
    }
    // AWQ and GPTQ are calibration-based: absent by default, an error when asked for.
    assert!(!rows
        .iter()
        .any(|r| r["format"] == "awq" || r["format"] == "gptq"));
    let err = lorq_fails(&[
        "bench",
        "kernels",
        "--shapes",
        "64x128",
        "--methods",
        "gptq",
    ]);
    assert!(err.contains("calibration-based"), "{err}");
}

/// The GPU-only switches on the CPU: a clear error naming them and the device they need, no
/// report and no panic.
#[test]
fn bench_kernels_gpu_switches_need_a_gpu() {
    for flag in ["--groups", "--gpu-time"] {
        let err = lorq_fails(&["bench", "kernels", "--shapes", "64x128", "--m", "1", flag]);
        assert!(
            err.contains("--groups") && err.contains("--device cuda"),
            "{flag}: {err}"
        );
        assert!(!err.contains("panicked"), "{flag}: {err}");
    }
}
