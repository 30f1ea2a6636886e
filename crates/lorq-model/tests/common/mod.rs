//! Shared helpers for the fixture tests: paths and the reference JSON made by
//! `fixtures/make_fixtures.py` (transformers + PEFT).
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use lorq_model::LoadedModel;
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn reference(model: &str) -> Value {
    let p = fixtures().join(model).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn load(model: &str) -> LoadedModel {
    LoadedModel::load(
        &fixtures().join(model).join("base"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Largest |a-b| relative to the largest |reference| value.
pub fn rel_max_diff(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale
}
