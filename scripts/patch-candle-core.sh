#!/bin/sh
# Usage: scripts/patch-candle-core.sh DEST
# Writes a copy of the registry's candle-core (the version Cargo.lock pins) to DEST with ONE change
# in its Cargo.toml: cudarc's features "cuda-version-from-build-system","dynamic-linking" become
# "cuda-13000","dynamic-loading", so that linking needs no CUDA shared library (the PyPI wheels ship
# none unversioned) and cudarc dlopens libcuda/libcublas/libcublasLt/libcurand/libnvrtc at run time.
# Generated at build time by scripts/build-cuda.sh into an ignored folder: no third-party source is
# committed.
set -eu
DEST=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VER=$(awk '/^name = "candle-core"$/ {getline; gsub(/version = |"/, ""); print; exit}' "$ROOT/Cargo.lock")
[ -n "$VER" ] || { echo "candle-core not found in Cargo.lock" >&2; exit 1; }
SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-"$VER" 2>/dev/null | head -1 || true)
if [ -z "$SRC" ]; then
    (cd "$ROOT" && cargo fetch -q)
    SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-"$VER" | head -1)
fi
if [ -f "$DEST/.lorq-patched-$VER" ]; then
    exit 0
fi
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
cp -r "$SRC" "$DEST"
rm -f "$DEST/.cargo-ok" "$DEST/.cargo_vcs_info.json" "$DEST/Cargo.toml.orig"
sed -i 's/^    "cuda-version-from-build-system",$/    "cuda-13000",/; s/^    "dynamic-linking",$/    "dynamic-loading",/' "$DEST/Cargo.toml"
grep -q '"dynamic-loading"' "$DEST/Cargo.toml" && ! grep -q '"dynamic-linking"' "$DEST/Cargo.toml" \
    || { echo "patching candle-core $VER failed: its cudarc features changed" >&2; exit 1; }
touch "$DEST/.lorq-patched-$VER"
echo "patched candle-core $VER -> $DEST" >&2
