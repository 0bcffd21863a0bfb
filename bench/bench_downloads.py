"""Download throughput and the cost of a resume, against the loopback server of the tests.

For each size, a random file is served on 127.0.0.1 (`test_downloads.LoopbackServer`): a full
download (`downloads.fetch`, sha256 checked), then one whose connection drops half-way and the
rerun that resumes it with a Range request (which hashes the kept half again before appending).

    .venv/bin/python bench/bench_downloads.py [--sizes-mb 64 256]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "VCMSynthesis"), str(ROOT / "VCMSynthesis" / "Testing" / "Python")]

from test_downloads import LoopbackServer  # noqa: E402
from VCMSynthesisLib.downloads import Expected, fetch  # noqa: E402
from VCMSynthesisLib.errors import UserError  # noqa: E402


def measure(size_mb: int, folder: Path) -> tuple[float, float, float]:
    data = os.urandom(size_mb << 20)
    expected = Expected(sha256=hashlib.sha256(data).hexdigest())
    server = LoopbackServer({"file.bin": data})
    threading.Thread(target=server.http.serve_forever, daemon=True).start()
    try:
        started = time.perf_counter()
        fetch(f"{server.url}/file.bin", folder / "full.bin", expected)
        full_s = time.perf_counter() - started
        server.drop["file.bin"] = len(data) // 2
        started = time.perf_counter()
        try:
            fetch(f"{server.url}/file.bin", folder / "resumed.bin", expected)
        except UserError:
            pass
        first_half_s = time.perf_counter() - started
        started = time.perf_counter()
        fetch(f"{server.url}/file.bin", folder / "resumed.bin", expected)
        resume_s = time.perf_counter() - started
        assert server.ranges("file.bin")[-1] == f"bytes={len(data) // 2}-"
    finally:
        server.http.shutdown()
        server.http.server_close()
    return full_s, first_half_s, resume_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    print("| size | full download | MB/s | dropped at half | resume (rehash + rest) |")
    print("|---|---|---|---|---|")
    for size_mb in args.sizes_mb:
        with tempfile.TemporaryDirectory() as folder:
            full_s, half_s, resume_s = measure(size_mb, Path(folder))
        print(f"| {size_mb} MiB | {full_s:.2f} s | {size_mb * 1.048576 / full_s:.0f} | {half_s:.2f} s | "
              f"{resume_s:.2f} s |")


if __name__ == "__main__":
    main()
