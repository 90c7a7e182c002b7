"""Throughput of `StreamingModel.encode` next to the Rust engine's own `infer`
on the same engine, the same texts and batch size 32, in one run.

    python python/bench/bench_encode.py [--model DIR] [--texts 256] [--rounds 5] [--json OUT]

`SURF_BENCH_QUICK=1` (or --quick) runs a tiny pass to check that it works.
The two sides alternate round by round so that drift in the machine's load
falls on both; the figure is the median round of each.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from surfing_weights import StreamingModel

BATCH_SIZE = 32
WORDS = (
    "weights stream over QUIC into a small GPU budget while the engine computes the layer "
    "before them and the host cache keeps what the GPU gave up"
).split()


def texts(count: int) -> list:
    """Sentences of 6 to 40 words, the same every run."""
    return [
        " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6 + (i * 7) % 35)) for i in range(count)
    ]


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(root / "assets" / "models" / "all-MiniLM-L6-v2"))
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("SURF_BENCH_QUICK") == "1")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    count, rounds = (BATCH_SIZE, 1) if args.quick else (args.texts, args.rounds)

    model = StreamingModel(model_path=args.model)
    inputs = texts(count)
    # Warm both paths: kernel choices, bind groups of every batch shape.
    model.encode(inputs, batch_size=BATCH_SIZE)
    model._time_engine(inputs, 1)

    python_seconds, rust_seconds = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        vectors = model.encode(inputs, batch_size=BATCH_SIZE)
        python_seconds.append(time.perf_counter() - started)
        rust_seconds.append(model._time_engine(inputs, 1)[0])
    assert vectors.shape == (count, model.dimension)

    python_rate = count / statistics.median(python_seconds)
    rust_rate = count / statistics.median(rust_seconds)
    figures = {
        "texts": count,
        "rounds": rounds,
        "batch_size": BATCH_SIZE,
        "python_encode_texts_per_s": round(python_rate, 2),
        "rust_infer_texts_per_s": round(rust_rate, 2),
        "ratio": round(python_rate / rust_rate, 4),
        "python_round_seconds": [round(x, 4) for x in python_seconds],
        "rust_round_seconds": [round(x, 4) for x in rust_seconds],
    }
    print(f"{'path':<34}{'texts/s':>10}")
    print(f"{'Python StreamingModel.encode':<34}{python_rate:>10.1f}")
    print(f"{'Rust Engine::infer':<34}{rust_rate:>10.1f}")
    print(f"ratio {figures['ratio']:.3f} ({count} texts, batch {BATCH_SIZE}, median of {rounds} rounds)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
