#!/usr/bin/env python3
"""Runs posenc_bench::fma_peak of bench_attention once under POSENC_SIMD_CAP=LEVEL and checks that
it measured LEVEL (the instruction set its label names) and a positive FLOP rate; a level the CPU
lacks is skipped with the reason (exit 77, ctest's SKIP_RETURN_CODE). Also checks that an unknown
POSENC_SIMD_CAP stops the executable with a message instead of measuring another set.

    check_fma_peak.py BUILD/bench/bench_attention avx512|avx2|portable
"""

import json
import os
import subprocess
import sys

LEVELS = ("portable", "avx2", "avx512")  # lowest first, as posenc::detail::simd_level
LANES = {"avx512": 16, "avx2": 8}  # 512- and 256-bit registers of 4-byte floats


def run(exe, cap, *args):
    env = dict(os.environ, POSENC_SIMD_CAP=cap)
    return subprocess.run([exe, "--benchmark_filter=^posenc_bench::fma_peak", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def main():
    if len(sys.argv) != 3 or sys.argv[2] not in LEVELS:
        sys.exit(__doc__)
    exe, level = sys.argv[1], sys.argv[2]

    bad = run(exe, "sse9")
    if bad.returncode == 0 or "POSENC_SIMD_CAP" not in bad.stderr:
        sys.exit(f"POSENC_SIMD_CAP=sse9 ran (exit {bad.returncode}) instead of stopping with a message")

    r = run(exe, level, "--benchmark_format=json", "--benchmark_min_time=0.001")
    if r.returncode != 0:
        sys.exit(f"{exe} failed (exit {r.returncode}):\n{r.stderr}")
    points = [b for b in json.loads(r.stdout)["benchmarks"] if b["name"].startswith("posenc_bench::fma_peak")]
    if len(points) != 1:
        sys.exit(f"expected one fma_peak point, got {len(points)}")
    b = points[0]
    if b.get("error_occurred"):
        sys.exit(f"fma_peak failed: {b.get('error_message')}")
    label = dict(tok.split("=", 1) for tok in b.get("label", "").split() if "=" in tok)
    print(f"POSENC_SIMD_CAP={level}: {b['FLOPS'] / 1e9:.1f} GFLOP/s, label '{b.get('label')}'")
    if label.get("isa") != level:
        detected = label.get("detected")
        if detected in LEVELS and LEVELS.index(detected) < LEVELS.index(level):
            print(f"skipped: this CPU's best instruction set is {detected}, below {level}")
            return 77
        sys.exit(f"measured {label.get('isa')} under POSENC_SIMD_CAP={level} (CPU: {detected})")
    if label.get("cap") != level:
        sys.exit(f"the label's cap is {label.get('cap')}, not {level}")
    if not b["FLOPS"] > 0:
        sys.exit(f"FLOPS = {b['FLOPS']}, not positive")
    lanes = int(label.get("lanes", 0))
    if level in LANES and lanes != LANES[level]:
        sys.exit(f"{level} measured with {lanes} lanes, not {LANES[level]}")
    if lanes < 1 or int(label.get("threads", 0)) < 1:
        sys.exit(f"lanes and threads must be positive: '{b.get('label')}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
