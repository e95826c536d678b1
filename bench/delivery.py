"""Delivery cost: what handing over N MB of audio costs the worker, inline vs S3.

Inline is base64 in the response; S3 is `Storage.deliver` uploading to moto's S3 server on
loopback (put + presign) and the caller downloading the presigned link. Loopback has no
network latency, so the S3 figures are the worker's own CPU cost plus moto's, a floor for a
real store.

    PYTHONPATH=tests .venv/bin/python bench/delivery.py [--sizes 1 5 20] [--repeats 5]

PYTHONPATH=tests puts the stand-in S3 store (tests/support/s3store.py, test code rather
than product code) on the path.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import time

import httpx

from higgs_runpod.delivery.storage import Delivery, Storage
from higgs_runpod.settings import load_settings
from support.s3store import StrictStore


def timed(func, repeats: int) -> float:
    """Median milliseconds of `func()` over `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def measure(
    storage: Storage, inline: Delivery, s3: Delivery, data: bytes, repeats: int
) -> tuple[float, float, float]:
    """(inline, upload, download) median milliseconds for one payload."""

    def deliver(plan: Delivery) -> dict:
        return asyncio.run(storage.deliver(plan, data, "wav", "bench"))

    url = deliver(s3)["audio_url"]
    return (
        timed(lambda: deliver(inline), repeats),
        timed(lambda: deliver(s3), repeats),
        timed(lambda: httpx.get(url).raise_for_status(), repeats),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 5, 20], help="MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.INFO)

    store = StrictStore()
    store.client().create_bucket(Bucket="bench")
    env = {"S3_BUCKET": "bench", "S3_ENDPOINT_URL": store.url, "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "MAX_INLINE_AUDIO_BYTES": str(10**9)}  # fmt: skip
    storage = Storage(load_settings(env))
    inline, s3 = storage.plan("inline", None), storage.plan("s3", None)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'MB':>6} {'inline ms':>10} {'s3 upload ms':>13} {'download ms':>12} {'MB/s up':>8}")
    for size in args.sizes:
        data = os.urandom(int(size * 1_000_000))
        inline_ms, upload_ms, download_ms = measure(storage, inline, s3, data, args.repeats)
        print(f"{size:>6.1f} {inline_ms:>10.1f} {upload_ms:>13.1f} {download_ms:>12.1f} "
              f"{size / upload_ms * 1000:>8.0f}")  # fmt: skip
    store.stop()


if __name__ == "__main__":
    main()
