#!/usr/bin/env bash
# Runs every bench in release on this machine, then rewrites BENCHMARKS.md and
# the paging plot from the figures they leave in bench-out/.
#
#   bash benches/report.sh              all benches, then the report
#   bash benches/report.sh --report     the report alone, from bench-out/ as it is
#
# Extra folders of figures (another machine's bench-out/, copied here) go in
# SURF_BENCH_DIRS, space-separated; each becomes a section of its own.
# SURF_BENCH_NOTE describes the run's conditions when they are not the usual.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" != "--report" ]]; then
    bash assets/fetch-model.sh
    rm -f bench-out/*.json
    for bench in kernels embed transport streaming paging http; do
        cargo bench -p surf-benches --bench "$bench"
    done
fi

mkdir -p bench-out
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)
cat > bench-out/machine.json <<JSON
{
  "cpu": "${cpu//\"/}",
  "cpu_cores": $(nproc),
  "memory_gib": $(awk '/MemTotal/ {printf "%.0f", $2 / 1048576}' /proc/meminfo),
  "date": "$(date -u +%Y-%m-%d)",
  "commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)",
  "conditions": "${SURF_BENCH_NOTE:-release build, idle machine}"
}
JSON

# shellcheck disable=SC2086
cargo run -q --release -p surf-benches --bin bench-report -- \
    --out BENCHMARKS.md --plot benches/plots/paging.png bench-out ${SURF_BENCH_DIRS:-}
