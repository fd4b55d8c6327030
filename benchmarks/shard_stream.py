"""Streaming shards from an S3-compatible server: maskray's read-ahead stream vs pyarrow's unbuffered one.

    python benchmarks/shard_stream.py [--shards data/demo/train] [--rounds 3]

Starts moto's S3 server on 127.0.0.1 (the ``s3`` extra), uploads ``--shards`` (written with
``launch/make_shards.py demo`` first if missing), then reads every sample of every shard through maskray's tar
reader (:func:`maskray.data.tar.tar_samples`) twice per round: from ``storage.open_input`` (a stream that reads
ahead ``STREAM_BUFFER_BYTES`` per request) and from pyarrow's ``open_input_stream`` without a buffer (one ranged
GET per read call: what maskray did before). Prints, per stream, the best round's seconds and the GET requests the
server served, the ratios, and one JSON line last. A real object store adds 10-50 ms per request, where this local
server adds about 2 ms: the request count is the figure that carries over.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


class RequestCounter(logging.Handler):
    """Counts the GET requests the local S3 server logs (werkzeug logs one line per request)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.gets = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.gets += "GET /" in record.getMessage()


def read_all(urls: list[str], open_stream) -> int:
    """Samples read from every shard in ``urls``, each opened with ``open_stream(url)``."""
    from maskray.data.tar import tar_samples

    count = 0
    for url in urls:
        with open_stream(url) as stream:
            count += sum(1 for _ in tar_samples(stream, url))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "demo" / "train")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (args.shards / "manifest.parquet").exists():
        subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), "demo", str(args.shards.parent)],
                       check=True)

    from helpers import local_s3, upload

    from maskray import storage
    from maskray.data import resolve_shards

    def unbuffered(url: str):
        filesystem, path = storage.resolve(url)
        return filesystem.open_input_stream(path)

    streams = {"read_ahead": storage.open_input, "unbuffered": unbuffered}
    counter = RequestCounter()
    server_log = logging.getLogger("werkzeug")
    server_log.addHandler(counter)  # before the server starts: werkzeug then adds no console handler of its own
    server_log.propagate = False
    with local_s3("maskray-bench") as bucket:
        urls = resolve_shards(upload(args.shards, f"{bucket}/shards")).urls
        server_log.setLevel(logging.INFO)
        results: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, open_stream in streams.items():
                counter.gets = 0
                start = time.perf_counter()
                samples = read_all(urls, open_stream)
                seconds = time.perf_counter() - start
                best = results.get(name)
                if best is None or seconds < best["seconds"]:
                    results[name] = {"seconds": round(seconds, 3), "get_requests": counter.gets, "samples": samples}
    for name, result in results.items():
        print(f"{name:>10}: {result['seconds']:.3f} s, {result['get_requests']} GET requests, "
              f"{result['samples']} samples from {len(urls)} shards")
    speedup = results["unbuffered"]["seconds"] / results["read_ahead"]["seconds"]
    fewer = results["unbuffered"]["get_requests"] / max(results["read_ahead"]["get_requests"], 1)
    print(f"read-ahead vs unbuffered: {speedup:.1f}x faster, {fewer:.0f}x fewer requests")
    print(json.dumps({"benchmark": "shard_stream", "shards": len(urls), "results": results,
                      "speedup": round(speedup, 2), "request_ratio": round(fewer, 1)}))


if __name__ == "__main__":
    main()
