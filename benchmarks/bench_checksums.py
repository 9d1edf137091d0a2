"""Throughput of the checkpoint checksum pass (psft_megatron.checkpointing.integrity.file_digest).

    python benchmarks/bench_checksums.py [--mib 1024] [--repeats 3]

Writes a file of random bytes, then hashes it ``--repeats`` times (sha256 and size in one
streaming pass, as a save's and a resume's check do, each by the rank that owns the file) and
prints the best time and GB/s. The file is in the page cache after writing, as a save's files are
on the rank that wrote them; a resume on another node reads them from the filesystem, whose
bandwidth then bounds the pass instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from psft_megatron.checkpointing.integrity import file_digest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="file size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.bin")
        with open(path, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            file_digest(path)
            best = min(best, time.perf_counter() - start)
    size = args.mib * (1 << 20)
    print(f"{args.mib} MiB: best of {args.repeats} {best:.3f} s, {size / best / 1e9:.2f} GB/s "
          f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
