#!/usr/bin/env bash
# Prepares a fresh machine: a Vulkan driver for wgpu (Mesa's software rasterizer
# where no GPU driver is installed) and the default model. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

has_vulkan_driver() {
  compgen -G "/usr/share/vulkan/icd.d/*.json" >/dev/null || compgen -G "/etc/vulkan/icd.d/*.json" >/dev/null
}

if ! has_vulkan_driver; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing mesa-vulkan-drivers (no Vulkan driver found) ..." >&2
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq mesa-vulkan-drivers >/dev/null
  else
    echo "error: no Vulkan driver found; install your GPU's Vulkan driver or Mesa's (mesa-vulkan-drivers)" >&2
    exit 1
  fi
fi

bash "$here/fetch-model.sh"
