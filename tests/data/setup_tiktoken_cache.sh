#!/usr/bin/env bash
# Seeds Python tiktoken's cache with the BPE files that ship inside the tiktoken-rs crate, so the
# reference counter works offline. tiktoken names a cached file by the SHA-1 of its URL and
# checks its SHA-256, so a wrong file is refused rather than used.
#   tests/data/setup_tiktoken_cache.sh [CACHE_DIR]   (default: target/tiktoken-cache)
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE="${1:-target/tiktoken-cache}"
mkdir -p "$CACHE"
cargo fetch --quiet
ASSETS=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'tiktoken-rs-0.7*' | head -n 1)/assets
for name in o200k_base cl100k_base; do
  url="https://openaipublic.blob.core.windows.net/encodings/$name.tiktoken"
  key=$(printf '%s' "$url" | sha1sum | cut -d' ' -f1)
  cp "$ASSETS/$name.tiktoken" "$CACHE/$key"
done
echo "$CACHE"
