//! Starting `lorq serve` as a child process on a free loopback port, and talking to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    pub child: Child,
    pub url: String,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// `lorq serve --model <model> --port 0 <extra...>`; waits until it listens.
    pub fn start(model: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lorq"))
            .args([
                "serve",
                "--model",
                model,
                "--hostname",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .args(extra)
            .env("LORQ_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lorq serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.split("listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("lorq serve did not start: {}", log.lock().unwrap());
            }
        };
        Self { child, url, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // The shell's builtin `kill`: no procps binary needed.
        let status = Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.child.id())])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns whether it exited successfully.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("lorq serve did not exit within {timeout:?}: {}", self.log());
    }

    /// The value of a Prometheus series (first line starting with `series`), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        let text = http()
            .get(format!("{}/metrics", self.url))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// POSTs JSON; returns the status and the body (JSON when it parses, else a string).
pub fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = http().post(url).json(body).send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// POSTs a streaming request and returns the `data:` payloads.
pub fn post_sse(url: &str, body: &Value) -> (u16, Vec<String>) {
    let r = http().post(url).json(body).send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    let events = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect();
    (status, events)
}

/// Copies a folder's files (one level) into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The Python with the client libraries (tests/clients/requirements.txt): `LORQ_TEST_CLIENT_PYTHON`,
/// else the repository's `.venv-clients` that scripts/test.sh makes.
pub fn client_python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LORQ_TEST_CLIENT_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv-clients/bin/python");
    p.exists().then_some(p)
}
