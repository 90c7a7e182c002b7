"""The caching guide's monitoring loop: stream a model under a small GPU
budget, and after each call print the hit rate, the latency and the memory the
weights hold, with a warning when the hit rate falls under 0.5.

    pip install ./python
    python examples/caching.py                       # the default model, from a weight server started here
    python examples/caching.py --server 10.0.0.1:7070 --server-cert server.pem --cache-size 3
"""

import argparse

from surfing_weights import StreamingBertModel, WeightServer

LOW_HIT_RATE = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder to serve from this process")
    parser.add_argument("--server", action="append", help="weight server host:port (repeatable)")
    parser.add_argument("--server-cert", help="PEM file of the servers' certificates")
    parser.add_argument("--token")
    parser.add_argument("--cache-size", type=int, default=2, help="encoder layers kept in GPU memory")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    local_server = None
    if args.server:
        model = StreamingBertModel(
            server=args.server, server_cert=args.server_cert, token=args.token, cache_size=args.cache_size
        )
    elif args.model:
        local_server = WeightServer(args.model, token=args.token)
        local_server.start()
        model = StreamingBertModel(server=local_server, token=args.token, cache_size=args.cache_size)
    else:
        # Neither: the default model, streamed from a weight server in this process.
        model = StreamingBertModel(cache_size=args.cache_size)

    texts = [
        "Weights surf in over QUIC.",
        "Only a few layers live in GPU memory at once.",
        "The rest wait in the host cache or on the server.",
    ]
    for round_number in range(1, args.rounds + 1):
        model.encode(texts)
        stats = model.get_inference_stats()
        info = model.get_cache_info()
        print(
            f"round {round_number}: hit rate {stats['cache_hit_rate']:.2f}, "
            f"avg inference {stats['avg_inference_time'] * 1000:.1f} ms, "
            f"GPU memory {info['memory_usage_mb']:.1f} MiB, "
            f"cached {', '.join(info['cached_components'])}"
        )
        if stats["cache_hit_rate"] < LOW_HIT_RATE:
            print(
                f"  warning: cache hit rate {stats['cache_hit_rate']:.2f} is under {LOW_HIT_RATE}; "
                f"a cache_size of {info['num_layers']} keeps every layer resident"
            )

    model.clear_cache()
    print(f"after clear_cache(): {model.get_cache_info()['cached_components']}")
    if local_server is not None:
        local_server.stop()


if __name__ == "__main__":
    main()
