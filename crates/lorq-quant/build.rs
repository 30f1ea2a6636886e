//! With the `cuda` feature: compiles every `kernels/*.cu` with nvcc into one fatbin per file (SASS for
//! `sm_<CUDA_COMPUTE_CAP>` — `sm_90a` by default — plus PTX of the same target for the driver to
//! JIT on newer GPUs), embedded by `src/cuda/` with `include_bytes!`. nvcc comes from `$NVCC`, else
//! `$CUDA_HOME/bin/nvcc`, else `nvcc` (scripts/cuda-toolchain.sh installs a pinned one). Without the
//! feature this does nothing, so CPU builds need no CUDA.
use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var("NVCC").unwrap_or_else(|_| match env::var("CUDA_HOME") {
        Ok(h) => format!("{h}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    let cc = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let arch = match cc.parse::<u32>() {
        Ok(c) if c >= 90 => format!("{c}a"),
        Ok(c) => c.to_string(),
        Err(_) => panic!("CUDA_COMPUTE_CAP={cc:?} is not a number like 90"),
    };
    // Every kernels/*.cu file is one fatbin, named after the file.
    println!("cargo:rerun-if-changed=kernels");
    let mut kernels: Vec<String> = std::fs::read_dir("kernels")
        .expect("kernels/ exists")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".cu").map(str::to_string)
        })
        .collect();
    kernels.sort();
    for k in &kernels {
        let src = format!("kernels/{k}.cu");
        println!("cargo:rerun-if-changed={src}");
        let out = out_dir.join(format!("{k}.fatbin"));
        let status = Command::new(&nvcc)
            .args([
                "--fatbin",
                "-O3",
                "-std=c++17",
                "--use_fast_math",
                "-Xptxas=-v",
            ])
            .arg(format!(
                "-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]"
            ))
            .arg("-Ikernels")
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {nvcc} (install it with scripts/cuda-toolchain.sh): {e}")
            });
        assert!(status.success(), "nvcc failed on {src}");
    }
}
