#!/usr/bin/env bash
# Prepares a fresh machine: a Vulkan driver for wgpu (Mesa's software rasterizer
# where no GPU driver is installed) and the default model. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

has_vulkan_driver() {
  compgen -G "/usr/share/vulkan/icd.d/*.json" >/dev/null || compgen -G "/etc/vulkan/icd.d/*.json" >/dev/null
}

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

if ! has_vulkan_driver; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing mesa-vulkan-drivers (no Vulkan driver found) ..." >&2
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq mesa-vulkan-drivers >/dev/null
  else
    echo "error: no Vulkan driver found; install your GPU's Vulkan driver or Mesa's (mesa-vulkan-drivers)" >&2
    exit 1
  fi
fi

# redis-server, for the tests and benches of the shared cache tier, which
# start their own on a free loopback port (never the system's service).
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server ..." >&2
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq redis-server >/dev/null
  else
    echo "warning: redis-server is missing and apt-get is not here; the Redis tests will be skipped" >&2
  fi
fi

bash "$here/fetch-model.sh"
# all-mpnet-base-v2, for the tests of the MPNet family against real weights.
bash "$here/fetch-model.sh" all-mpnet-base-v2

# The official openai Python client, for the test that runs it unchanged
# against `surf http` (with numpy, it asks for base64 vectors by default).
venv="$here/.venv"
if ! "$venv/bin/python" -c 'import openai, numpy' >/dev/null 2>&1; then
  echo "installing the openai Python client into $venv ..." >&2
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian's own Python keeps venv in a package of its own.
    "${sudo_cmd[@]}" apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check openai numpy
fi
