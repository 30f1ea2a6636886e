//! `lorq plan` and `--quantize auto --memory-budget` end to end on the tiny fixtures.

mod common;

use common::*;
use serde_json::Value;

fn row<'a>(v: &'a Value, m: &str) -> &'a Value {
    v["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["method"] == m)
        .unwrap_or_else(|| panic!("no row {m}"))
}

fn bytes(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap()
}

/// The plan's per-format estimates equal what the real formats' `bytes()` report (quant-report),
/// byte for byte: the estimate sums the same layouts, tables included, so the documented slack is 0.
#[test]
fn plan_estimates_equal_quant_report_bytes_and_auto_is_none() {
    let base = fixture("llama/base");
    let plan = lorq(&["plan", "--model", &base, "--json"]);
    assert_eq!(plan["chosen"], "none");
    assert_eq!(plan["prequantized"], Value::Null);
    let names: Vec<&str> = plan["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 12);
    assert!(names.contains(&"none") && names.contains(&"bf16") && names.contains(&"gptq"));

    let report = lorq(&["quant-report", "--model", &base, "--json"]);
    for m in report["methods"].as_array().unwrap() {
        let name = m["method"].as_str().unwrap();
        if name == "rtn-int4" {
            continue; // quant-report's INT4 reference row, not a --quantize method
        }
        assert_eq!(
            bytes(row(&plan, name), "linear_bytes"),
            bytes(m, "bytes"),
            "{name}: plan estimate vs quant-report bytes()"
        );
    }
    for name in ["bitsandbytes-nf4", "bitsandbytes"] {
        assert!(report["methods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["method"] == name));
    }
    assert_eq!(
        bytes(row(&plan, "none"), "linear_bytes"),
        4 * plan["linear_params"].as_u64().unwrap()
    );
}

#[test]
fn plan_with_budget_picks_fp8_on_hopper_and_eetq_on_cpu() {
    let base = fixture("llama/base");
    let full = lorq(&["plan", "--model", &base, "--json"]);
    let reserve = bytes(&full, "reserve_bytes");
    // Fits the 8-bit formats, not f32.
    let budget = bytes(row(&full, "eetq"), "weight_bytes") + reserve;
    assert!(budget < bytes(row(&full, "none"), "weight_bytes") + reserve);
    let budget = budget.to_string();

    let v = lorq(&[
        "plan",
        "--model",
        &base,
        "--device",
        "sm_90",
        "--memory-budget",
        &budget,
        "--json",
    ]);
    assert_eq!(v["chosen"], "fp8", "{}", v["summary"]);
    assert_eq!(row(&v, "none")["fits"], false);
    assert_eq!(row(&v, "fp8")["chosen"], true);

    let v = lorq(&[
        "plan",
        "--model",
        &base,
        "--memory-budget",
        &budget,
        "--json",
    ]);
    assert_eq!(v["chosen"], "eetq", "{}", v["summary"]);
    assert!(row(&v, "fp8")["reason"]
        .as_str()
        .unwrap()
        .contains("emulated"));

    // The human table names the choice.
    let out = run_ok(&["plan", "--model", &base, "--memory-budget", &budget]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--quantize auto would pick eetq"), "{text}");

    // Nothing fits: a clear error naming the smallest footprint.
    let err = lorq_fails(&["plan", "--model", &base, "--memory-budget", "1MiB"]);
    assert!(err.contains("smallest footprint is"), "{err}");

    // Bad sizes.
    let err = lorq_fails(&["plan", "--model", &base, "--memory-budget", "24 parsecs"]);
    assert!(
        err.contains("--memory-budget") && err.contains("24GiB"),
        "{err}"
    );
}

#[test]
fn prequantized_checkpoint_plans_its_own_format() {
    let awq = fixture("prequantized/awq-4bit-g32");
    let v = lorq(&["plan", "--model", &awq, "--memory-budget", "1KiB", "--json"]);
    assert_eq!(v["prequantized"], "awq");
    assert_eq!(v["chosen"], "awq");
    assert_eq!(row(&v, "eetq")["available"], false);
}

/// `--quantize auto --memory-budget` loads with the method the plan picks.
#[test]
fn quantize_auto_with_budget_uses_the_plan() {
    let base = fixture("llama/base");
    let full = lorq(&["plan", "--model", &base, "--json"]);
    let budget =
        (bytes(row(&full, "eetq"), "weight_bytes") + bytes(&full, "reserve_bytes")).to_string();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("t.txt");
    std::fs::write(&data, "Once upon a time there was a little girl.\n").unwrap();
    let out = run_ok(&[
        "eval",
        "ppl",
        "--model",
        &base,
        "--data",
        data.to_str().unwrap(),
        "--ctx",
        "8",
        "--stride",
        "4",
        "--memory-budget",
        &budget,
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--quantize auto would pick eetq"), "{err}");
}
