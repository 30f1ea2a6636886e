use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lorq_model::weights::WeightFiles;
use lorq_model::ModelConfig;
use serde_json::json;

/// Describe a model folder (architecture, parameters, dtypes, bytes) or a PEFT adapter folder.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq inspect ~/.cache/lorq/models/smollm2-135m-instruct
  lorq inspect ./my-adapter --json")]
pub struct InspectArgs {
    /// A model folder, an adapter folder, or `default`.
    pub dir: String,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let as_path = PathBuf::from(&a.dir);
    if as_path.join("adapter_config.json").exists() {
        return inspect_adapter(&as_path, a.json);
    }
    let dir = lorq_model::pull::resolve_model(&a.dir)?;
    let cfg = ModelConfig::load(&dir)?;
    let weights = WeightFiles::open(&dir)?;
    let mut by_dtype: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut params = 0usize;
    for (_, dtype, shape) in weights.inventory() {
        let n: usize = shape.iter().product();
        let size = match dtype.as_str() {
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" => 2,
            "F64" | "I64" => 8,
            _ => 1,
        };
        let e = by_dtype.entry(dtype).or_default();
        e.0 += 1;
        e.1 += n * size;
        params += n;
    }
    let v = json!({
        "dir": dir,
        "architecture": cfg.architecture.name(),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": format!("{:?}", cfg.rope_scaling),
        "sliding_window": cfg.sliding_window,
        "parameters": params,
        "parameters_from_config": cfg.parameter_count(),
        "tensors_by_dtype": by_dtype.iter().map(|(k, (n, b))| (k.clone(), json!({"tensors": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
        "bytes": by_dtype.values().map(|(_, b)| b).sum::<usize>(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model        {}", dir.display());
        println!("architecture {}", cfg.architecture.name());
        println!(
            "shape        {} layers, hidden {}, mlp {}, heads {} (kv {}), head_dim {}, vocab {}",
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.vocab_size
        );
        println!("parameters   {} ({:.1} M)", params, params as f64 / 1e6);
        for (d, (n, b)) in &by_dtype {
            println!(
                "dtype {d:<6} {n} tensors, {:.1} MiB",
                *b as f64 / (1 << 20) as f64
            );
        }
        println!(
            "tied embeddings {}, rope theta {}, rope scaling {:?}",
            cfg.tie_word_embeddings, cfg.rope_theta, cfg.rope_scaling
        );
    }
    Ok(())
}

fn inspect_adapter(dir: &std::path::Path, as_json: bool) -> Result<()> {
    let ad = lorq_lora::LoraAdapter::load(dir, &candle_core::Device::Cpu)?;
    let mut modules: Vec<_> = ad
        .modules()
        .map(|(p, m)| (p.clone(), m.rank(), m.scale))
        .collect();
    modules.sort_by(|a, b| a.0.cmp(&b.0));
    let mut targets: Vec<String> = modules
        .iter()
        .map(|(p, _, _)| p.rsplit('.').next().unwrap_or(p).to_string())
        .collect();
    targets.sort();
    targets.dedup();
    let v = json!({
        "dir": dir,
        "r": ad.config.r,
        "lora_alpha": ad.config.lora_alpha,
        "use_rslora": ad.config.use_rslora,
        "target_modules": ad.config.target_modules.describe(),
        "targets": targets,
        "modules": modules.len(),
        "dtype": format!("{:?}", ad.dtype()),
        "bytes": ad.bytes(),
        "base_model": ad.config.base_model_name_or_path,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("adapter      {}", dir.display());
        println!(
            "r {} alpha {} rslora {}",
            ad.config.r, ad.config.lora_alpha, ad.config.use_rslora
        );
        println!(
            "targets      {} ({} modules)",
            targets.join(","),
            modules.len()
        );
        println!("dtype        {:?}, {} bytes", ad.dtype(), ad.bytes());
        for (p, r, s) in modules {
            println!("  {p:<50} r={r:<3} scale={s}");
        }
    }
    Ok(())
}
