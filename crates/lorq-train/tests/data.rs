//! The data pipeline against transformers' tokenization and masks (fixtures/train/data, made by
//! fixtures/train/make_data_fixtures.py), plus errors, truncation, packing, splits and resume.

use std::path::{Path, PathBuf};

use lorq_train::data::{
    load_train_eval, Batcher, DataOptions, Dataset, EvalData, Example, Formatter, IGNORE_INDEX,
};
use lorq_train::TrainError;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/train/data")
}

fn formatter(tok: &str) -> Formatter {
    Formatter::from_model_dir(&fixtures().join(tok)).unwrap()
}

fn expected(tok: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(format!("expected-{tok}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn labels(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn opts(max_seq_len: usize) -> DataOptions {
    DataOptions {
        max_seq_len,
        ..Default::default()
    }
}

fn write_jsonl(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn check_against_transformers(tok: &str) {
    let fmt = formatter(tok);
    let exp = expected(tok);
    assert_eq!(
        u64::from(fmt.eos_id()),
        exp["eos_token_id"].as_u64().unwrap()
    );
    assert_eq!(fmt.bos_prefix(), ids(&exp["bos_prefix"]).as_slice());
    for train_on_prompt in [false, true] {
        let o = DataOptions {
            train_on_prompt,
            ..opts(4096)
        };
        let (ds, report) = Dataset::load(&fixtures().join("rows.jsonl"), &fmt, &o).unwrap();
        let rows = exp["rows"].as_array().unwrap();
        assert_eq!(report.rows, rows.len());
        assert_eq!(report.used_rows, rows.len());
        assert_eq!(ds.len(), rows.len());
        for (i, (got, want)) in ds.examples().iter().zip(rows).enumerate() {
            assert_eq!(got.input_ids, ids(&want["input_ids"]), "{tok} row {i} ids");
            let key = if train_on_prompt {
                "labels_all"
            } else {
                "labels"
            };
            assert_eq!(got.labels, labels(&want[key]), "{tok} row {i} {key}");
        }
    }
}

#[test]
fn ids_and_labels_match_transformers_smollm2_template() {
    check_against_transformers("smollm2-tok");
}

#[test]
fn ids_and_labels_match_transformers_llama_bos_chatml() {
    check_against_transformers("llama-bos-tok");
}

#[test]
fn masks_cover_the_completion_only() {
    let fmt = formatter("smollm2-tok");
    let (ds, _) = Dataset::load(&fixtures().join("rows.jsonl"), &fmt, &opts(4096)).unwrap();
    let tok = fmt.tokenizer();
    let trained = |ex: &Example| {
        let ids: Vec<u32> = ex
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        tok.decode(&ids, false).unwrap()
    };
    let ex = ds.examples();
    assert_eq!(
        trained(&ex[0]),
        format!(
            "{}<|im_end|>",
            "The quick brown fox jumps over the lazy dog."
        )
    );
    assert_eq!(
        trained(&ex[2]),
        " Paris is the capital of France.<|im_end|>"
    );
    assert_eq!(trained(&ex[3]), "Guten Morgen<|im_end|>");
    assert_eq!(trained(&ex[5]), "4<|im_end|>\n6, of course.<|im_end|>\n");
    assert_eq!(trained(&ex[6]), "こんにちは 👋<|im_end|>\n");
    // Alpaca rows end with EOS; chat rows end with what the template writes.
    assert_eq!(*ex[3].input_ids.last().unwrap(), fmt.eos_id());
    assert_eq!(
        tok.decode(&ex[6].input_ids[ex[6].len() - 1..], false)
            .unwrap(),
        "\n"
    );
}

fn load_err(body: &str, skip: bool) -> Result<(Dataset, lorq_train::data::LoadReport), TrainError> {
    let dir = tempfile::tempdir().unwrap();
    let p = write_jsonl(dir.path(), "bad.jsonl", body);
    let o = DataOptions {
        skip_bad_rows: skip,
        ..opts(512)
    };
    Dataset::load(&p, &formatter("smollm2-tok"), &o)
}

fn expect_data_error(body: &str, line: usize, needle: &str) {
    match load_err(body, false) {
        Err(TrainError::Data {
            path,
            line: l,
            message,
        }) => {
            assert!(path.ends_with("bad.jsonl"), "{}", path.display());
            assert_eq!(l, line, "{message}");
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        Err(e) => panic!("expected a data error, got {e}"),
        Ok(_) => panic!("expected a data error for {body:?}"),
    }
}

const GOOD: &str = r#"{"text": "fine"}"#;

#[test]
fn bad_rows_name_file_line_and_field() {
    // Blank lines count for the line number but are not rows.
    expect_data_error(&format!("{GOOD}\n\n{{\"text\": \"x\"\n"), 3, "invalid JSON");
    expect_data_error(
        &format!("{GOOD}\n{{\"instruction\": \"q\"}}\n"),
        2,
        "`output` is missing",
    );
    expect_data_error(
        "{\"instruction\": \"q\", \"output\": 3}\n",
        1,
        "`output`: expected a string",
    );
    expect_data_error(
        &format!("{GOOD}\n{{\"messages\": \"hi\"}}\n"),
        2,
        "`messages`: expected an array",
    );
    expect_data_error(
        &format!("{GOOD}\n{GOOD}\n{{\"messages\": []}}\n"),
        3,
        "`messages`: empty array",
    );
    expect_data_error(
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}"#,
        1,
        "`messages[1].role`: unknown role \"bot\"",
    );
    expect_data_error(
        r#"{"messages": [{"role": "user"}]}"#,
        1,
        "`content` is missing",
    );
    expect_data_error(r#"{"prompt": "x"}"#, 1, "no `text`, `messages`");
    expect_data_error("[1, 2]", 1, "expected a JSON object");
}

#[test]
fn skip_bad_rows_counts_and_reports() {
    let mut body = String::new();
    for i in 0..8 {
        body.push_str(&format!("{{\"text\": \"row {i}\"}}\n{{\"output\": {i}}}\n"));
    }
    let (ds, report) = load_err(&body, true).unwrap();
    assert_eq!(ds.len(), 8);
    assert_eq!(report.rows, 16);
    assert_eq!(report.bad_rows, 8);
    assert_eq!(report.bad_row_reasons.len(), 5);
    assert!(
        report.bad_row_reasons[0].contains("bad.jsonl:2:"),
        "{}",
        report.bad_row_reasons[0]
    );
    assert!(report.to_string().contains("and 3 more"), "{report}");
}

#[test]
fn empty_and_unusable_files_are_clear_errors() {
    for body in ["", "\n  \n", r#"{"output": 1}"#] {
        match load_err(body, true) {
            Err(TrainError::Config(m)) => assert!(m.contains("no usable rows"), "{m}"),
            other => panic!("{body:?}: {:?}", other.map(|r| r.1)),
        }
    }
    // A chat with no assistant turn trains on nothing.
    match load_err(r#"{"messages": [{"role": "user", "content": "a"}]}"#, false) {
        Err(TrainError::Config(m)) => assert!(m.contains("1 with no trained token"), "{m}"),
        other => panic!("{:?}", other.map(|r| r.1)),
    }
    assert!(matches!(
        Dataset::load(
            Path::new("no/such.jsonl"),
            &formatter("smollm2-tok"),
            &opts(8)
        ),
        Err(TrainError::Io { .. })
    ));
}

#[test]
fn truncation_keeps_the_head_and_skips_fully_masked_rows() {
    let fmt = formatter("smollm2-tok");
    let exp = expected("smollm2-tok");
    let (full, _) = Dataset::load(&fixtures().join("rows.jsonl"), &fmt, &opts(4096)).unwrap();
    let max = 40;
    let (ds, report) = Dataset::load(&fixtures().join("rows.jsonl"), &fmt, &opts(max)).unwrap();
    let mut kept = Vec::new();
    let mut masked = 0;
    for (i, row) in exp["rows"].as_array().unwrap().iter().enumerate() {
        let l = labels(&row["labels"]);
        let cut = &l[..l.len().min(max)];
        if cut.iter().all(|&x| x == IGNORE_INDEX) {
            masked += 1;
        } else {
            kept.push(i);
        }
    }
    assert!(
        masked > 0,
        "the fixture should have a row whose completion is past {max} tokens"
    );
    assert_eq!(report.fully_masked_rows, masked);
    assert_eq!(
        report.truncated_rows,
        full.examples().iter().filter(|e| e.len() > max).count()
    );
    assert_eq!(ds.len(), kept.len());
    for (got, &i) in ds.examples().iter().zip(&kept) {
        let want = &full.examples()[i];
        let n = want.len().min(max);
        assert_eq!(got.input_ids, want.input_ids[..n]);
        assert_eq!(got.labels, want.labels[..n]);
    }
}

#[test]
fn packing_makes_exact_chunks_and_keeps_the_rest() {
    let fmt = formatter("llama-bos-tok");
    let (rows, _) = Dataset::load(&fixtures().join("rows.jsonl"), &fmt, &opts(100_000)).unwrap();
    let all_ids: Vec<u32> = rows
        .examples()
        .iter()
        .flat_map(|e| e.input_ids.clone())
        .collect();
    let all_labels: Vec<i64> = rows
        .examples()
        .iter()
        .flat_map(|e| e.labels.clone())
        .collect();
    let len = 64;
    let o = DataOptions {
        packing: true,
        ..opts(len)
    };
    let (ds, report) = Dataset::load(&fixtures().join("rows.jsonl"), &fmt, &o).unwrap();
    assert_eq!(report.truncated_rows, 0);
    assert_eq!(ds.rows().len(), rows.len());
    assert_eq!(ds.len(), all_ids.len().div_ceil(len));
    let last = ds.examples().last().unwrap().len();
    assert!(
        last > 0 && last < len,
        "fixture total should not be a multiple of {len}"
    );
    for e in &ds.examples()[..ds.len() - 1] {
        assert_eq!(e.len(), len);
    }
    let ids: Vec<u32> = ds
        .examples()
        .iter()
        .flat_map(|e| e.input_ids.clone())
        .collect();
    let lab: Vec<i64> = ds
        .examples()
        .iter()
        .flat_map(|e| e.labels.clone())
        .collect();
    assert_eq!(ids, all_ids);
    assert_eq!(lab, all_labels);
    assert_eq!(ds.num_tokens(), all_ids.len());
    assert_eq!(
        ds.num_label_tokens(),
        all_labels.iter().filter(|&&l| l != -100).count()
    );
}

fn numbered(n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let body: String = (0..n)
        .map(|i| format!("{{\"text\": \"r{i}\"}}\n"))
        .collect();
    let p = write_jsonl(dir.path(), "n.jsonl", &body);
    (dir, p)
}

#[test]
fn eval_split_is_seeded_disjoint_and_complete() {
    let (_d, p) = numbered(50);
    let fmt = formatter("smollm2-tok");
    let (ds, _) = Dataset::load(&p, &fmt, &opts(64)).unwrap();
    let (t1, e1) = ds.split(0.1, 7).unwrap();
    let (t2, e2) = ds.split(0.1, 7).unwrap();
    let (_, e3) = ds.split(0.1, 8).unwrap();
    assert_eq!((t1.len(), e1.len()), (45, 5));
    assert_eq!(e1.examples(), e2.examples());
    assert_eq!(t1.examples(), t2.examples());
    assert_ne!(e1.examples(), e3.examples());
    let mut all: Vec<_> = t1.examples().iter().chain(e1.examples()).cloned().collect();
    all.sort_by(|a, b| a.input_ids.cmp(&b.input_ids));
    let mut orig = ds.examples().to_vec();
    orig.sort_by(|a, b| a.input_ids.cmp(&b.input_ids));
    assert_eq!(all, orig);
    assert!(ds.split(0.0, 1).is_err());
    assert!(ds.split(1.0, 1).is_err());

    let loaded = load_train_eval(&p, &EvalData::Split(0.2), &fmt, &opts(64)).unwrap();
    assert_eq!(loaded.eval.unwrap().len(), 10);
    let loaded = load_train_eval(
        &p,
        &EvalData::File(fixtures().join("rows.jsonl")),
        &fmt,
        &opts(64),
    )
    .unwrap();
    assert_eq!(loaded.train.len(), 50);
    assert!(loaded.eval_report.is_some());
}

#[test]
fn batches_cover_each_epoch_once_and_reshuffle() {
    let (_d, p) = numbered(10);
    let (ds, _) = Dataset::load(&p, &formatter("smollm2-tok"), &opts(64)).unwrap();
    let mut b = Batcher::new(&ds, 4, 3).unwrap();
    assert_eq!(b.steps_per_epoch(), 3);
    let mut epochs = Vec::new();
    for _ in 0..2 {
        let sizes: Vec<Vec<Example>> = (0..3).map(|_| b.next_batch()).collect();
        assert_eq!(sizes.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        let flat: Vec<Example> = sizes.into_iter().flatten().collect();
        let mut sorted = flat.clone();
        sorted.sort_by(|a, b| a.input_ids.cmp(&b.input_ids));
        let mut orig = ds.examples().to_vec();
        orig.sort_by(|a, b| a.input_ids.cmp(&b.input_ids));
        assert_eq!(sorted, orig);
        epochs.push(flat);
    }
    assert_ne!(epochs[0], epochs[1], "each epoch has its own order");
    assert_ne!(epochs[0], ds.examples(), "shuffled");
    assert_eq!(b.epoch(), 2);
}

#[test]
fn position_restores_exactly() {
    let (_d, p) = numbered(13);
    let (ds, _) = Dataset::load(&p, &formatter("smollm2-tok"), &opts(64)).unwrap();
    let mut a = Batcher::new(&ds, 3, 11).unwrap();
    for _ in 0..7 {
        a.next_batch();
    }
    let pos = a.position();
    let saved = serde_json::to_string(&pos).unwrap();
    let want: Vec<Vec<Example>> = (0..9).map(|_| a.next_batch()).collect();

    let mut b = Batcher::new(&ds, 3, 11).unwrap();
    b.restore(serde_json::from_str(&saved).unwrap()).unwrap();
    let got: Vec<Vec<Example>> = (0..9).map(|_| b.next_batch()).collect();
    assert_eq!(got, want);

    let mut other_seed = Batcher::new(&ds, 3, 12).unwrap();
    assert!(other_seed.restore(pos).is_err());
    let (_d2, p2) = numbered(14);
    let (ds2, _) = Dataset::load(&p2, &formatter("smollm2-tok"), &opts(64)).unwrap();
    assert!(Batcher::new(&ds2, 3, 11).unwrap().restore(pos).is_err());
    assert!(Batcher::new(&ds, 0, 11).is_err());
}
