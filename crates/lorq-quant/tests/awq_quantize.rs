//! AWQ's scale and clip search, and the AWQ GEMM writer (the reader's inverse).

use candle_core::{Device, Tensor};
use lorq_quant::awq::quantize::{awq_clip, awq_search_scale, AwqParams};
use lorq_quant::awq::{AwqConfig, AwqTensor};
use lorq_quant::input_stats::InputStats;
use lorq_quant::QuantTensor;

fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut u = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| ((-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos()) as f32)
        .collect()
}

/// Inputs with a few salient (large) channels, as LLM activations have.
fn inputs(rows: usize, k: usize) -> Tensor {
    let mut x = normal(rows * k, 21);
    for r in 0..rows {
        for c in [3, 40, 77] {
            x[r * k + c] *= 25.0;
        }
    }
    Tensor::from_vec(x, (rows, k), &Device::Cpu).unwrap()
}

fn unscaled_dequant(t: &AwqTensor, s: &[f32], k: usize) -> Vec<f32> {
    t.dequantize_f32()
        .chunks(k)
        .flat_map(|r| r.iter().zip(s).map(|(v, f)| v / f).collect::<Vec<_>>())
        .collect()
}

#[test]
fn scale_search_beats_rtn_and_clip_helps() {
    let (k, rows) = (128, 512);
    let (n1, n2) = (32, 64);
    let w1 = normal(n1 * k, 1);
    let w2: Vec<f32> = normal(n2 * k, 2).iter().map(|v| v * 0.5).collect();
    let x = inputs(rows, k);
    let mut st = InputStats::new(k);
    st.add(&x).unwrap();
    for duo in [false, true] {
        let p = AwqParams {
            group_size: 32,
            duo_scaling: duo,
            ..AwqParams::default()
        };
        let s = awq_search_scale(&[(&w1, n1), (&w2, n2)], &st, &p, "mlp").unwrap();
        assert!(
            s.ratio > 0.0,
            "salient channels call for a scale (duo {duo})"
        );
        assert!(
            s.error < 0.8 * s.rtn_error,
            "duo {duo}: {} vs RTN {}",
            s.error,
            s.rtn_error
        );
        // The reported error is that of the written tensor.
        let ws: Vec<f32> = w1
            .chunks(k)
            .flat_map(|r| {
                r.iter()
                    .zip(&s.scales)
                    .map(|(v, f)| v * f)
                    .collect::<Vec<_>>()
            })
            .collect();
        let t = AwqTensor::quantize(&ws, n1, k, 32, "mlp.gate").unwrap();
        let e1 = st
            .output_error(&w1, &unscaled_dequant(&t, &s.scales, k))
            .unwrap();
        assert!(e1 < s.error * 1.01, "{e1} vs {}", s.error);
        // Clipping never increases the per-group error it minimizes (shrink 0 is a candidate).
        let mut wc = ws.clone();
        awq_clip(&mut wc, n1, &st, &s.scales, &p, "mlp.gate").unwrap();
        let tc = AwqTensor::quantize(&wc, n1, k, 32, "mlp.gate").unwrap();
        let ec = st
            .output_error(&w1, &unscaled_dequant(&tc, &s.scales, k))
            .unwrap();
        assert!(ec <= e1 * 1.0001, "clip {ec} vs {e1}");
        // Writer → reader round trip, byte for byte.
        let sd = tc.to_state_dict("m");
        let cfg = AwqConfig::from_json(&tc.config().to_json()).unwrap();
        let back = AwqTensor::from_state_dict(
            "m",
            &|name| sd.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()),
            &cfg,
        )
        .unwrap();
        assert_eq!(back.to_state_dict("m"), sd);
        assert_eq!(back.dequantize_f32(), tc.dequantize_f32());
        assert_eq!(back.shape(), (n1, k));
    }
    let e = awq_search_scale(
        &[(&w1, n1)],
        &st,
        &AwqParams {
            group_size: 48,
            ..AwqParams::default()
        },
        "layer.mlp",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("layer.mlp") && e.contains("48"), "{e}");
}
