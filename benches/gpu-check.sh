#!/usr/bin/env bash
# The check to run on a machine with a real GPU: it picks the card (and fails
# at once on a software adapter), runs the golden tests on it, the kernels,
# embed and streaming benches in quick form and one short table of their
# figures, then the kernel tests of every family the card supports, and the
# paging bench in full with the time left before GPU_CHECK_DEADLINE (seconds
# from the start, 1200 by default). On an NVIDIA H200 the kernel tests alone
# took 346 s, so a device call of 600 s wants GPU_CHECK_DEADLINE=540.
#
# Such machines (the `device` tool's) have no Rust toolchain and take at most
# 64 MiB of files a call, so the work is split in two:
#
#   bash benches/gpu-check.sh prepare   here: release executables, the model
#                                       in two halves and the golden files,
#                                       packed under .gpu-check/ (ignored)
#   bash benches/gpu-check.sh run       there (or here, on any adapter): unpack
#                                       them, run everything, print the table
#
# With the device tool, after `prepare`, three calls on one warm machine:
#   1. carry [".gpu-check/model-1"], command "true"
#   2. carry [".gpu-check/model-2"], command "true"
#   3. carry [".gpu-check/bin", ".gl"], command
#        "for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig; bash benches/gpu-check.sh run"
#      (`.gl` holds the Vulkan loader packages, as the tool's README shows).
# Paths carried by an earlier call stay on a warm machine, so the third call
# finds both halves of the model. `run` packs bench-out/*.json into
# figures.tar and writes the log and the table, in $OUT when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
pack=.gpu-check
model=assets/models/all-MiniLM-L6-v2

prepare() {
    bash assets/fetch-model.sh
    # `.gitignore` lists $pack/, so a checkout without `.git/info` (a
    # worktree, an unpacked archive) needs nothing written here.
    rm -rf "$pack"
    mkdir -p "$pack/bin" "$pack/model-1" "$pack/model-2"
    # The executables, all in the bench profile so the dependencies build
    # once; their paths come from cargo's JSON messages.
    local messages
    messages=$(mktemp)
    local built=0
    cargo test --profile bench --locked --no-run --message-format=json \
        -p surf-engine --test kernels -p surf-tests --test golden --test f16 >"$messages" &&
        cargo bench --locked --no-run --message-format=json \
            -p surf-benches --bench kernels --bench embed --bench streaming --bench paging --bench multimodel >>"$messages" &&
        cargo build --profile bench --locked --message-format=json \
            -p surf-server --bin surf >>"$messages" ||
        built=$?
    python3 - "$messages" "$pack/bin" <<'PY'
import json, shutil, sys
messages, dest = sys.argv[1], sys.argv[2]
wanted = {"test-kernels", "test-golden", "test-f16", "bench-kernels", "bench-embed", "bench-streaming", "bench-paging", "bench-multimodel", "bin-surf"}
for line in open(messages):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-message" and m["message"].get("level") == "error":
        print(m["message"].get("rendered", ""), file=sys.stderr)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kinds = m["target"]["kind"]
        kind = "bench" if "bench" in kinds else "bin" if "bin" in kinds else "test"
        name = f'{kind}-{m["target"]["name"]}'
        if name not in wanted:
            continue
        shutil.copy(m["executable"], f"{dest}/{name}")
        print("packed", name)
PY
    rm -f "$messages"
    if ((built != 0)); then
        echo "the release build failed" >&2
        return 1
    fi
    strip "$pack"/bin/* 2>/dev/null || true
    xz -T0 -6 "$pack"/bin/*
    # The weights split in two, each half under the tool's 64 MiB a call.
    split -n 2 -d "$model/model.safetensors" "$pack/model-1/weights."
    mv "$pack/model-1/weights.01" "$pack/model-2/"
    (cd "$model" && find . -type f ! -name model.safetensors ! -name README.md -print0 |
        tar --null -cf - -T -) | xz >"$pack/bin/model-files.tar.xz"
    mkdir -p "$pack/bin/golden"
    cp ../shared/golden/dev-sentences.txt ../shared/golden/minilm-dev.*.json "$pack/bin/golden/"
    du -sh "$pack"/*
}

# The maker of this machine's GPU, by the PCI vendor of its display devices
# (NVIDIA also by its device node, which containers show without DRM cards).
card_vendor() {
    local id
    for id in $(cat /sys/class/drm/card*/device/vendor 2>/dev/null); do
        case $id in
            0x10de) echo NVIDIA && return ;;
            0x1002) echo AMD && return ;;
            0x8086) echo Intel && return ;;
        esac
    done
    [[ -e /dev/nvidia0 ]] && echo NVIDIA
    return 0
}

# Picks the adapter every step then uses and writes `surf info --json` (backend,
# device type, driver, subgroup sizes, limits) to $2. Prefers the card:
# SURF_ADAPTER defaults to its maker's name. When Vulkan shows no GPU, tries
# wgpu's GL backend. Fails at once on a software adapter: this check measures
# GPUs, and llvmpipe's figures are in BENCHMARKS.md already.
choose_adapter() {
    local surf=$1 report=$2 vendor
    vendor=$(card_vendor)
    if [[ -z "${SURF_ADAPTER:-}" && -n "$vendor" ]]; then
        export SURF_ADAPTER=$vendor
    fi
    echo "card: ${vendor:-none seen}; SURF_ADAPTER=${SURF_ADAPTER:-} " | tee -a "$log"
    local backend
    for backend in "${WGPU_BACKEND:-vulkan}" gl; do
        if WGPU_BACKEND=$backend SURF_KERNELS=portable "$surf" info --json >"$report" 2>>"$log"; then
            local kind
            kind=$(python3 -c 'import json,sys; a=json.load(open(sys.argv[1]))["adapter"]; print(a["device_type"])' "$report")
            if [[ "$kind" != Cpu ]]; then
                export WGPU_BACKEND=$backend
                python3 -c 'import json,sys; a=json.load(open(sys.argv[1]))["adapter"]; print("adapter:", a["name"], a["backend"], a["device_type"], a["driver"], a["driver_info"], "subgroups", a["subgroup_min_size"], "to", a["subgroup_max_size"])' "$report" | tee -a "$log"
                return 0
            fi
            echo "the $backend backend chose a software adapter" | tee -a "$log"
        else
            echo "the $backend backend found no usable GPU adapter (see $log)" | tee -a "$log"
        fi
        [[ "$backend" == gl ]] && break
    done
    echo "FAILED: no GPU adapter on Vulkan or GL, only a software one or none; this check measures GPUs" | tee -a "$log"
    return 1
}

run() {
    local out=${OUT:-$root/bench-out}
    mkdir -p "$out" bench-out
    # Reassemble what `prepare` packed, unless this is the machine it was
    # packed on.
    if [[ ! -f "$model/model.safetensors" ]]; then
        mkdir -p "$model"
        cat "$pack"/model-1/weights.* "$pack"/model-2/weights.* >"$model/model.safetensors"
        xz -dc "$pack/bin/model-files.tar.xz" | tar -xf - -C "$model"
    fi
    local bin=$pack/run
    rm -rf "$bin" && mkdir -p "$bin"
    for f in "$pack"/bin/*.xz; do
        [[ "$f" == *model-files* ]] && continue
        xz -dc "$f" >"$bin/$(basename "${f%.xz}")"
    done
    chmod +x "$bin"/*
    if ! ldconfig -p 2>/dev/null | grep -q libvulkan && [[ -d .gl ]]; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
    fi
    if [[ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json && -z "${VK_DRIVER_FILES:-}" ]]; then
        export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    fi
    export SURF_REPO_ROOT=$root SURF_GOLDEN_DIR=$root/$pack/bin/golden SURF_BENCH_QUICK=1
    # Measure the families afresh on this adapter.
    export SURF_CACHE_DIR=$root/$pack/cache
    rm -rf "$SURF_CACHE_DIR"
    # A missing adapter must fail the check, not skip it.
    export CI=true
    local log=$out/gpu-check.log
    : >"$log"
    choose_adapter "$bin/bin-surf" "$out/adapter.json" || return 1
    local status=0
    # Each step's log and figures (figures.tar) go to $OUT as soon as it
    # ends, so a run stopped at the device's time limit still brings back
    # what it made.
    step() {
        echo "== $*" | tee -a "$log"
        local start=$SECONDS
        if "$@" >>"$log" 2>&1; then
            echo "   ok in $((SECONDS - start)) s" | tee -a "$log"
        else
            echo "   FAILED in $((SECONDS - start)) s (see $log)" | tee -a "$log"
            status=1
        fi
        # One archive, as the device tool brings back at most 8 files.
        (cd bench-out && tar -cf "$out/figures.tar" -- *.json) 2>/dev/null || true
    }
    step "$bin/test-golden" --test-threads 1 --nocapture
    step "$bin/test-f16" --test-threads 1
    step "$bin/bench-kernels" --bench
    step "$bin/bench-embed" --bench
    step "$bin/bench-streaming" --bench
    table
    # Last of the must-runs: they check every kernel of every family the
    # adapter supports, the 8-lane subgroup ones included, which a GPU runs
    # slowly (346 s for all of them on an H200).
    step "$bin/test-kernels" --test-threads 1
    # The device's calls have a hard limit: these run only in the time left
    # before GPU_CHECK_DEADLINE seconds from this script's start, and are
    # stopped there.
    step_in_time_left() {
        local least=$1 name=$2
        shift 2
        local left=$((${GPU_CHECK_DEADLINE:-1200} - SECONDS))
        if ((left > least)); then
            step timeout --signal=INT --kill-after=5 "$left" "$@"
            table
        else
            echo "== $name skipped: ${left} s left" | tee -a "$log"
        fi
    }
    # Models larger than the GPU, in full (a Qwen3-Embedding-4B shape of
    # about 8 GB under 1 GiB budgets, and the 0.6B budget sweep).
    SURF_BENCH_QUICK=0 step_in_time_left 60 "paging bench" "$bin/bench-paging" --bench
    # Several models under one budget, in quick form.
    step_in_time_left 30 "multimodel bench" "$bin/bench-multimodel" --bench
    cp "$log" "$out/" 2>/dev/null || true
    return $status
}

# One short table of every figure so far, to the terminal and $OUT.
table() {
    local out=${OUT:-$root/bench-out}
    python3 - "$root/bench-out" "$out" <<'PY' | tee "$out/gpu-check-table.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name + ".json")))
    except (OSError, ValueError):
        return None
k, e, s, p, mm = load("kernels"), load("embed"), load("streaming"), load("paging"), load("multimodel")
print("| what | figure |")
print("| --- | --- |")
try:
    a = json.load(open(os.path.join(sys.argv[2], "adapter.json")))["adapter"]
    print(f'| adapter | {a["name"]} ({a["backend"]}, {a["device_type"]}), driver {a["driver"]} {a["driver_info"]} |')
    print(f'| subgroups, timestamps, limits | {a["subgroup_min_size"]} to {a["subgroup_max_size"]} lanes, '
          f'timestamps {a.get("timestamps")}, {a["max_storage_buffer_binding_size"] >> 20} MiB a binding |')
except (OSError, ValueError, KeyError):
    pass
if k:
    print(f'| adapter | {k["adapter"]} |')
    print(f'| FMA peak | {k["fma_peak_gflop_s"]:.0f} GFLOP/s |')
    for row in k.get("families", []):
        per_family = row.get("rates", row)
        rates = ", ".join(f"{f} {per_family[f]:.1f}" for f in ("portable", "subgroup8", "tiled", "blocked", "half") if f in per_family)
        print(f'| {row["op"]} rows {row["rows"]} k {row["k"]} n {row["n"]} ({row["unit"]}) | {rates}; '
              f'autotuned {row["autotuned"]}, {row["autotuned_over_fixed"]:.2f} x {row["fixed"]} |')
    for f in k.get("fusions", []):
        print(f'| projection + residual + norm, rows {f["rows"]} k {f["k"]} n {f["n"]} | fused {f["fused_us"]:.1f} us, '
              f'separate {f["separate_us"]:.1f} us{", fused" if f["fused"] else ""} |')
    if k.get("engine_per_s_32_short"):
        print(f'| engine, batches of 32 short sentences | {k["engine_per_s_32_short"]:.0f} embeddings/s |')
if e:
    for row in e.get("rows", []):
        model = row.get("model", e.get("model", ""))
        versus = (f', candle (CPU) {row["candle_per_s"]:.0f}/s, ratio {row["ratio"]:.2f}'
                  if row.get("candle_per_s") is not None else ', no candle model of this family')
        print(f'| embed {model} {row["input"]} batch {row.get("batch")} | {row["ours_per_s"]:.0f}/s{versus} |')
if s:
    print(f'| streaming overlap ratio (target <= 1.10 on a GPU) | {s.get("overlap_ratio", float("nan")):.3f} |')
if p:
    for row in p.get("budgets", []):
        print(f'| paging {p["model"]["name"]} {row["eviction"]} {row["dtype"]}, {row["budget_layers"]} layers ({row["budget_mb"]:.0f} MB) | '
              f'{row["per_s"]:.2f}/s, {row["ratio_to_resident"]:.2f} of resident, {row["uploaded_mb_per_pass"]:.0f} MB uploaded a pass |')
for row in (mm or {}).get("rows", []):
    print(f'| several models, budget {row["budget_share"] * 100:.0f}% of their weights | {row["embeddings_per_s"]:.1f} emb/s, '
          f'{row["ratio"]:.2f} of all resident |')
big = (p or {}).get("larger_than_the_gpu") or load("paging-large") or {}
if big:
    print(f'| larger than the GPU: {big.get("model")} ({big.get("model_mb", 0):.0f} MB) under {big.get("vram_budget_mb")} MiB VRAM, '
          f'{big.get("host_cache_mb")} MiB cache | {big.get("texts_per_s", 0):.3f} texts/s, {big.get("fetched_mb_per_pass", 0):.0f} MB fetched and '
          f'{big.get("uploaded_mb_per_pass", 0):.0f} MB uploaded a pass, peak RSS {big.get("peak_rss_mb", 0):.0f} MB (bound {big.get("rss_bound_mb", 0):.0f}) |')
PY
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *)
        echo "usage: bash benches/gpu-check.sh prepare|run" >&2
        exit 2
        ;;
esac
