#!/usr/bin/env python3
"""Runs posenc_bench::read_bandwidth of bench_attention once and checks that it read the whole buffer
and measured a positive rate: the benchmark sums a buffer of ones on every thread and stops with an
error when the sum is not the buffer's length (a loop the compiler shortened, a thread's share
skipped), so a rate is only reported for bytes that were really read. Also checks the label
(the instruction set of the loop, the threads) that bench/report.py and docs/benchmarks.md quote.

    check_read_bandwidth.py BUILD/bench/bench_attention
"""

import json
import subprocess
import sys

LEVELS = ("portable", "avx2", "avx512")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    exe = sys.argv[1]
    r = subprocess.run([exe, "--benchmark_filter=^posenc_bench::read_bandwidth", "--benchmark_format=json",
                        "--benchmark_min_time=0.001"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        sys.exit(f"{exe} failed (exit {r.returncode}):\n{r.stderr}")
    points = [b for b in json.loads(r.stdout)["benchmarks"] if b["name"].startswith("posenc_bench::read_bandwidth")]
    if len(points) != 1:
        sys.exit(f"expected one read_bandwidth point, got {len(points)}")
    b = points[0]
    if b.get("error_occurred"):
        sys.exit(f"read_bandwidth failed: {b.get('error_message')}")
    if not b["name"].startswith("posenc_bench::read_bandwidth/268435456"):
        sys.exit(f"{b['name']}: the ceiling bench/report.py reads is read_bandwidth/268435456 (256 MiB)")
    label = dict(tok.split("=", 1) for tok in b.get("label", "").split() if "=" in tok)
    print(f"{b['bytes_per_second'] / 1e9:.1f} GB/s read, label '{b.get('label')}'")
    if label.get("isa") not in LEVELS:
        sys.exit(f"the label names no instruction set: '{b.get('label')}'")
    if int(label.get("threads", 0)) < 1 or int(b.get("threads", 0)) != int(label["threads"]):
        sys.exit(f"threads: label '{b.get('label')}', counter {b.get('threads')}")
    if not b["bytes_per_second"] > 0:
        sys.exit(f"bytes_per_second = {b['bytes_per_second']}, not positive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
