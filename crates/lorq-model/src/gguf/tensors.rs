//! GGUF tensors → Hugging Face tensors: name mapping, the supported ggml types, dequantization to
//! f32 (candle's dequantizers) and the Q/K row un-permutation.

use super::config::LlamaParams;
use super::GgufImportError;
use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek};
use std::path::Path;

/// ggml tensor types the importer dequantizes (to f32); any other type is an error.
pub const SUPPORTED_TYPES: [GgmlDType; 8] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
];

/// The ggml name of a tensor type, as llama.cpp and gguf-py spell it.
pub(crate) fn dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

const LAYER_MAP: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// What a GGUF tensor becomes in the HF checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mapped {
    /// Written under this HF name; `Some(heads)` when its rows are un-permuted with that head count.
    Tensor {
        hf_name: String,
        unpermute_heads: Option<usize>,
    },
    /// Not part of the HF checkpoint (e.g. `rope_freqs.weight`).
    Skipped,
}

/// Maps a GGUF tensor name to its HF name (llama.cpp's names → transformers' Llama names);
/// `None` for a `blk.*` tensor this importer does not know.
pub(crate) fn map_name(name: &str, params: &LlamaParams) -> Option<Mapped> {
    let plain = |n: &str| Mapped::Tensor {
        hf_name: n.to_string(),
        unpermute_heads: None,
    };
    Some(match name {
        "token_embd.weight" => plain("model.embed_tokens.weight"),
        "output_norm.weight" => plain("model.norm.weight"),
        "output.weight" => plain("lm_head.weight"),
        _ if name.starts_with("blk.") => {
            let parts: Vec<&str> = name.split('.').collect();
            let [_, layer, kind, "weight"] = parts[..] else {
                return None;
            };
            layer.parse::<usize>().ok()?;
            let hf = LAYER_MAP.iter().find(|(k, _)| *k == kind)?.1;
            let unpermute_heads = match kind {
                "attn_q" => Some(params.n_head),
                "attn_k" => Some(params.n_kv_head),
                _ => None,
            };
            Mapped::Tensor {
                hf_name: format!("model.layers.{layer}.{hf}.weight"),
                unpermute_heads,
            }
        }
        _ => Mapped::Skipped,
    })
}

/// Reverses llama.cpp's Q/K row permutation: numpy's
/// `w.reshape(heads, dim, 2, cols).swapaxes(1, 2).reshape(rows, cols)` with `dim = rows / heads / 2`.
pub(crate) fn unpermute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Option<Vec<f32>> {
    if heads == 0 || !rows.is_multiple_of(heads * 2) || w.len() != rows * cols {
        return None;
    }
    let dim = rows / heads / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..heads {
        for j in 0..2 {
            for d in 0..dim {
                let src = (h * dim + d) * 2 + j;
                out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

/// One tensor to write: where it comes from and what it becomes.
#[derive(Debug)]
pub(crate) struct TensorPlan<'a> {
    pub(crate) gguf_name: &'a str,
    pub(crate) info: &'a TensorInfo,
    pub(crate) hf_name: String,
    pub(crate) unpermute_heads: Option<usize>,
}

/// Checks every tensor's name and type before anything is written. Plans are in file order.
pub(crate) fn plan_tensors<'a>(
    path: &Path,
    content: &'a Content,
    params: &LlamaParams,
) -> Result<Vec<TensorPlan<'a>>, GgufImportError> {
    let mut infos: Vec<(&'a String, &'a TensorInfo)> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(name, info)| (info.offset, name.as_str()));
    let mut seen: HashMap<String, &str> = HashMap::new();
    let mut plans = Vec::new();
    for (name, info) in infos {
        let unexpected = |why: &str| GgufImportError::UnexpectedTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason: why.to_string(),
        };
        let mapped =
            map_name(name, params).ok_or_else(|| unexpected("not a llama layer tensor"))?;
        let Mapped::Tensor {
            hf_name,
            unpermute_heads,
        } = mapped
        else {
            tracing::debug!(tensor = %name, "skipping tensor that has no HF counterpart");
            continue;
        };
        if !SUPPORTED_TYPES.contains(&info.ggml_dtype) {
            return Err(GgufImportError::UnsupportedTensorType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: dtype_name(info.ggml_dtype).to_string(),
            });
        }
        if let Some(heads) = unpermute_heads {
            let dims = info.shape.dims();
            if dims.len() != 2 || dims[0] % (heads * 2) != 0 {
                return Err(GgufImportError::BadTensorShape {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    shape: dims.to_vec(),
                    reason: format!(
                        "Q/K un-permutation needs 2 dims and rows divisible by 2 × {heads} heads"
                    ),
                });
            }
        }
        if let Some(other) = seen.insert(hf_name.clone(), name) {
            return Err(unexpected(&format!("maps to {hf_name}, as {other} does")));
        }
        plans.push(TensorPlan {
            gguf_name: name,
            info,
            hf_name,
            unpermute_heads,
        });
    }
    Ok(plans)
}

/// Reads one tensor and returns its HF f32 values (dequantized, Q/K rows un-permuted).
pub(crate) fn load_f32<R: Read + Seek>(
    path: &Path,
    reader: &mut R,
    tensor_data_offset: u64,
    plan: &TensorPlan<'_>,
) -> Result<Vec<f32>, GgufImportError> {
    let failed = |e: candle_core::Error| GgufImportError::TensorRead {
        path: path.to_path_buf(),
        tensor: plan.gguf_name.to_string(),
        message: e.to_string(),
    };
    let qtensor = plan
        .info
        .read(reader, tensor_data_offset, &Device::Cpu)
        .map_err(failed)?;
    let values = qtensor
        .dequantize(&Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(failed)?;
    match plan.unpermute_heads {
        None => Ok(values),
        Some(heads) => {
            let dims = plan.info.shape.dims();
            unpermute(&values, dims[0], dims[1], heads).ok_or_else(|| {
                GgufImportError::BadTensorShape {
                    path: path.to_path_buf(),
                    tensor: plan.gguf_name.to_string(),
                    shape: dims.to_vec(),
                    reason: format!("cannot un-permute with {heads} heads"),
                }
            })
        }
    }
}

/// Counts of planned tensors by ggml type, for logging.
pub(crate) fn type_histogram(plans: &[TensorPlan<'_>]) -> BTreeMap<String, usize> {
    let mut hist = BTreeMap::new();
    for p in plans {
        *hist
            .entry(dtype_name(p.info.ggml_dtype).to_string())
            .or_insert(0) += 1;
    }
    hist
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_matches_numpy_swapaxes() {
        // rows = heads(2) * dim(2) * 2; row r holds the value r in both columns.
        let (rows, cols, heads) = (8, 2, 2);
        let w: Vec<f32> = (0..rows).flat_map(|r| [r as f32; 2]).collect();
        let out = unpermute(&w, rows, cols, heads).unwrap();
        let order: Vec<f32> = out.chunks(cols).map(|c| c[0]).collect();
        // numpy: np.arange(8).reshape(2, 2, 2).swapaxes(1, 2).reshape(8) == [0, 2, 1, 3, 4, 6, 5, 7]
        assert_eq!(order, [0., 2., 1., 3., 4., 6., 5., 7.]);
        assert!(unpermute(&w, rows, cols, 3).is_none());
    }

    #[test]
    fn names_map_to_transformers_llama() {
        let params = LlamaParams {
            architecture: "llama".into(),
            n_head: 9,
            n_kv_head: 3,
            hidden: 576,
            n_layer: 30,
            ffn: 1536,
            context_length: 8192,
            rms_eps: 1e-5,
            rope_theta: 1e5,
        };
        let t = |n: &str, h: Option<usize>| Mapped::Tensor {
            hf_name: n.into(),
            unpermute_heads: h,
        };
        let map_name = |n: &str, p: &LlamaParams| map_name(n, p).ok_or(n.to_string());
        assert_eq!(
            map_name("blk.7.attn_q.weight", &params).unwrap(),
            t("model.layers.7.self_attn.q_proj.weight", Some(9))
        );
        assert_eq!(
            map_name("blk.0.attn_k.weight", &params).unwrap(),
            t("model.layers.0.self_attn.k_proj.weight", Some(3))
        );
        assert_eq!(
            map_name("blk.2.ffn_norm.weight", &params).unwrap(),
            t("model.layers.2.post_attention_layernorm.weight", None)
        );
        assert_eq!(
            map_name("output.weight", &params).unwrap(),
            t("lm_head.weight", None)
        );
        assert_eq!(
            map_name("rope_freqs.weight", &params).unwrap(),
            Mapped::Skipped
        );
        assert!(map_name("blk.0.attn_q.bias", &params).is_err());
        assert!(map_name("blk.0.ssm_in.weight", &params).is_err());
    }
}
