#!/usr/bin/env python3
"""Turns a results folder written by bench/run.py into results.csv, report.md and PNG plots.

    python3 bench/report.py bench/results/<date>-<host>

Every figure is shown next to its ratio to the ceiling measured in the same run: GFLOP/s to the
multiply-add peak of the instruction set the kernels ran with (AVX-512, AVX2+FMA or portable,
named in every heading) and to Eigen's SGEMM of the same head_dim, bytes per second to the copy
bandwidth (decode, which only reads: to the read bandwidth). A ratio whose ceiling is missing says
why instead. docs/benchmarks.md explains each
figure and ceiling. Prints the headline ratios on stdout.
"""

import csv
import glob
import json
import math
import os
import re
import sys

KIB, MIB, GIB = 1024.0, 1024.0 ** 2, 1024.0 ** 3
TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}

CSV_COLUMNS = ["group", "name", "path", "encoder", "mask", "n_q", "n_kv", "heads", "kv_heads", "d", "window",
               "storage", "variant", "status", "time_s", "iterations", "tokens_per_s", "gflops", "ratio_fma",
               "fma_ceiling", "ratio_sgemm", "gb_per_s", "ratio_copy", "ratio_read", "ratio_cache_copy",
               "speedup_vs_fp32", "kernel_peak_bytes", "allocs_per_iter", "workspace_bytes", "input_bytes",
               "rss_peak_bytes", "rss_growth_bytes", "page_size", "seqs", "kv_bytes", "flop", "roofline_s",
               "roofline_bound", "ratio_roofline", "vs_contiguous", "vs_parts", "source"]

FLOP_FORMULA = ("FLOP per call = 4 · d · heads · (visible query-key pairs): 2d for q·k and 2d for p·v per pair. "
                "Full: 4·n_q·n_kv·d·heads. Causal (n_q = n_kv = n): 4·d·heads·n(n+1)/2, about half. "
                "Sliding window w (causal): 4·d·heads·Σ_i min(i+1, w+1). GQA counts query heads. "
                "The naive path is credited with the same useful FLOP although it computes every score.")


# ---------------------------------------------------------------- formatting

def fmt(x, digits=3):
    """A number with `digits` significant digits, no exponent for ordinary sizes."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if x == 0:
        return "0"
    mag = int(math.floor(math.log10(abs(x))))
    if mag >= 6 or mag <= -4:
        return f"{x:.{digits - 1}e}"
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def fmt_ratio(x, why="no figure"):
    """A ratio with two decimals; never blank: when it is missing, `why`."""
    return why if x is None else f"{x:.2f}"


def ratio_cell(r, key):
    """The ratio `key` of row `r`, never blank: the figure, `not run` for a point that did not run
    (its status says why), else why there is no ceiling."""
    if r.get(key) is not None:
        return fmt_ratio(r[key])
    if r.get("status") not in (None, "ok"):
        return "not run"
    return r.get("why", {}).get(key, "no figure")


# The instruction sets of posenc_bench::fma_peak (bench/ceilings.hpp), by the names of
# POSENC_SIMD_CAP.
ISA_NAMES = {"avx512": "AVX-512", "avx2": "AVX2+FMA", "portable": "portable"}


def peak_base(info):
    """'AVX2+FMA peak': the multiply-add ceiling named by the instruction set it was measured with
    (the one the attention kernels ran with)."""
    isa = info.get("isa")
    if isa == "avx512":
        return "AVX-512 FMA peak"
    if isa == "avx2":
        return "AVX2+FMA peak"
    if isa == "portable":
        return f"portable {info.get('lanes', '?')}-lane {info.get('op', 'mul+add')} peak"
    return "FMA peak (instruction set not recorded)"


def peak_name(info):
    """'AVX2+FMA peak (2 threads)': peak_base and the thread count."""
    return peak_base(info) + (f" ({info['threads']} threads)" if info.get("threads") else "")


def fmt_bytes(b):
    if b is None:
        return ""
    b = float(b)
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(b) >= size:
            return f"{fmt(b / size)} {unit}"
    return f"{int(b)} B"


def fmt_n(n):
    n = int(n)
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


def fmt_time(s):
    if s is None:
        return ""
    if s >= 1:
        return f"{fmt(s)} s"
    if s >= 1e-3:
        return f"{fmt(s * 1e3)} ms"
    return f"{fmt(s * 1e6)} µs"


def status_cell(r):
    """Empty for a point that ran, else why it did not (`skipped: would need X GiB`, an error)."""
    return "" if r["status"] == "ok" else r["status"]


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def slope(points):
    """Least-squares slope of log(y) against log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return None if sxx == 0 else sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


# ---------------------------------------------------------------- loading

def load_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def parse_label(label):
    out = {}
    for tok in (label or "").split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = int(v) if re.fullmatch(r"-?\d+", v) else v
    return out


def name_args(name):
    """'BM_rope_cache/tokens:1024/layout:0/simd:2/real_time' -> {'tokens': 1024, ...}."""
    return {k: int(v) for k, v in re.findall(r"([a-z_]+):(-?\d+)", name)}


class Results:
    def __init__(self, folder):
        self.folder = folder
        self.meta = load_json(os.path.join(folder, "meta.json"), {})
        self.gb = {}
        for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
            data = load_json(path)
            if isinstance(data, dict) and "benchmarks" in data and not os.path.basename(path).startswith("ring_"):
                self.gb[os.path.splitext(os.path.basename(path))[0]] = data["benchmarks"]
        self.probes = []
        try:
            with open(os.path.join(folder, "probe_memory.jsonl")) as f:
                self.probes = [json.loads(line) for line in f if line.strip()]
        except OSError:
            pass
        self.ring = self.load_ring()
        self.steps = load_json(os.path.join(folder, "steps.json"), [])
        self.ceilings()
        self.rows = self.build_rows()

    # ---- ceilings ----

    def find(self, source, prefix, failed=False):
        return [b for b in self.gb.get(source, []) if b["name"].startswith(prefix)
                and (failed or not b.get("error_occurred"))]

    def ceilings(self):
        def measure(prefix, key):
            """(start, end, why): the figure at the start and at the end of the run, and why there is
            none when both are missing (the point failed, or it is not in this run)."""
            start = self.find("bench_attention", prefix)
            end = self.find("ceilings_end", prefix)
            failed = self.find("bench_attention", prefix, True) + self.find("ceilings_end", prefix, True)
            why = None
            if not start and not end:
                name = prefix.removeprefix("posenc_bench::")
                why = (f"{name} failed: {failed[0].get('error_message', 'error')}" if failed
                       else f"{name} not in this run")
            return start[0].get(key) if start else None, end[0].get(key) if end else None, why

        self.fma_start, self.fma_end, self.fma_why = measure("posenc_bench::fma_peak", "FLOPS")
        self.copy_start, self.copy_end, self.copy_why = measure("posenc_bench::copy_bandwidth/268435456",
                                                                "bytes_per_second")
        self.cache_start, self.cache_end, self.cache_why = measure("posenc_bench::copy_bandwidth/524288",
                                                                   "bytes_per_second")
        self.read_start, self.read_end, self.read_why = measure("posenc_bench::read_bandwidth/268435456",
                                                                "bytes_per_second")
        # The ceiling is the best the machine showed in this run.
        self.fma = max(filter(None, [self.fma_start, self.fma_end]), default=None)
        self.copy = max(filter(None, [self.copy_start, self.copy_end]), default=None)
        self.cache_copy = max(filter(None, [self.cache_start, self.cache_end]), default=None)
        self.read = max(filter(None, [self.read_start, self.read_end]), default=None)
        self.fma_info = self.peak_info()
        self.fma_name = peak_name(self.fma_info)
        self.sgemm = {}
        for b in self.find("bench_eigen_ceiling", "ceiling/eigen_sgemm"):
            a = name_args(b["name"])
            self.sgemm[(a["n"], a["d"])] = b["FLOPS"]
        failed = self.find("bench_eigen_ceiling", "ceiling/eigen_sgemm", True)
        self.sgemm_why = ("" if self.sgemm else f"eigen_sgemm failed: {failed[0].get('error_message', 'error')}"
                          if failed else "bench_eigen_ceiling not in this run")

    def peak_info(self):
        """What the multiply-add peak was measured with: isa, lanes, op, threads, detected, cap (the
        label of posenc_bench::fma_peak), else the instruction set run.py recorded in meta.json. A
        peak without a label is the AVX-512 one, the only one earlier runs measured."""
        recs = (self.find("bench_attention", "posenc_bench::fma_peak", True) +
                self.find("ceilings_end", "posenc_bench::fma_peak", True))
        for b in recs:
            lab = parse_label(b.get("label"))
            if "isa" in lab:
                return lab
        ok = [b for b in recs if not b.get("error_occurred")]
        if ok:
            return {"isa": "avx512", "lanes": 16, "op": "fma", "threads": int(ok[0].get("threads", 0)) or None}
        simd = self.meta.get("simd") or {}
        return {"isa": simd["in_use"]} if simd.get("in_use") else {}

    def of_peak(self, r):
        """'= 0.78 of the AVX-512 FMA peak (2 threads)', or why there is no ratio."""
        if r.get("ratio_fma") is not None:
            return f"= {fmt_ratio(r['ratio_fma'])} of the {self.fma_name}"
        return f"(ratio to the {self.fma_name}: {ratio_cell(r, 'ratio_fma')})"

    def sgemm_for(self, n, d):
        """Eigen SGEMM FLOP/s of head_dim d at the measured n nearest to n (in log scale)."""
        cands = [(abs(math.log(k[0] / n)), v) for k, v in self.sgemm.items() if k[1] == d]
        return min(cands)[1] if cands else None

    def sgemm_best(self, d):
        vals = [v for k, v in self.sgemm.items() if k[1] == d]
        return max(vals) if vals else None

    # ---- rows ----

    def base_row(self, b, source):
        unit = TIME_UNITS.get(b.get("time_unit", "ns"), 1e-9)
        err = b.get("error_occurred")
        row = {"name": b["name"].removesuffix("/real_time"), "source": source,
               "status": b.get("error_message", "error") if err else "ok"}
        if not err:
            row["time_s"] = b.get("real_time", 0) * unit
            row["iterations"] = b.get("iterations")
            # Google Benchmark's MemoryManager figures, or where a point ran with repetitions (and
            # without it), the benchmark's own heap counters of the same quantities.
            row["kernel_peak_bytes"] = b.get("max_bytes_used", b.get("heap_peak_bytes"))
            row["allocs_per_iter"] = b.get("allocs_per_iter", b.get("allocs_per_call"))
        return row

    @staticmethod
    def set_ratio(row, key, value, ceiling, why):
        """row[key] = value / ceiling; without a ceiling None, and why in row["why"][key]."""
        row[key] = value / ceiling if ceiling else None
        if not ceiling:
            row.setdefault("why", {})[key] = "no ceiling: " + why

    def rate_ratios(self, row, b):
        if b.get("FLOPS"):
            row["gflops"] = b["FLOPS"] / 1e9
            self.set_ratio(row, "ratio_fma", b["FLOPS"], self.fma, self.fma_why)
            row["fma_ceiling"] = self.fma_name
        bps = b.get("bytes_per_second")
        if bps:
            row["gb_per_s"] = bps / 1e9
            self.set_ratio(row, "ratio_copy", bps, self.copy, self.copy_why)

    def build_rows(self):
        rows = []
        for b in self.gb.get("bench_attention", []):
            if b["name"].startswith("posenc_bench::"):
                continue
            row = self.base_row(b, "bench_attention")
            lab = parse_label(b.get("label"))
            row.update({k: lab.get(k) for k in ("group", "path", "mask", "n_q", "n_kv", "heads", "kv_heads", "d",
                                                 "window")})
            row["encoder"] = lab.get("enc")
            row["storage"] = lab.get("storage", "fp32")  # runs before bf16/fp16 points were all fp32
            if row["storage"] == "bf16_qk":  # bf16 storage, bf16 Q K^T products: which kernels ran them
                row["variant"] = "vdpbf16ps" if b.get("vdpbf16ps") else "float kernels"
            if row["status"] == "ok":
                self.rate_ratios(row, b)
                row["tokens_per_s"] = b.get("tokens_per_second")
                row["workspace_bytes"] = b.get("workspace_bytes")
                row["input_bytes"] = b.get("input_bytes")
                if row["group"] != "decode" and row.get("gflops"):
                    sg = self.sgemm_for(row["n_kv"], row["d"])
                    self.set_ratio(row, "ratio_sgemm", b["FLOPS"], sg,
                                   self.sgemm_why or f"no Eigen SGEMM of d = {row['d']} in this run")
                if row["group"] != "decode":  # prefill is not bandwidth bound: no GB/s column
                    row.pop("gb_per_s", None)
                    row.pop("ratio_copy", None)
                elif row.get("gb_per_s"):
                    # Decode reads K and V and writes one row per head: its ceiling is the read
                    # bandwidth (memcpy's also moves the written bytes).
                    self.set_ratio(row, "ratio_read", row["gb_per_s"] * 1e9, self.read, self.read_why)
                if row["group"] == "decode" and row.get("time_s"):
                    # Decode's roofline, as the serving points': K/V bytes and FLOP of the call.
                    row["kv_bytes"] = (b.get("bytes_per_second") or 0) * row["time_s"]
                    row["flop"] = (b.get("FLOPS") or 0) * row["time_s"]
                    self.roofline(row)
            rows.append(row)
        self.speedups(rows)
        rows += self.serving_rows()
        for b in self.gb.get("bench_encoders", []):
            row = self.base_row(b, "bench_encoders")
            lab = parse_label(b.get("label"))
            row.update({"group": "encoder_apply", "encoder": lab.get("enc"), "variant": lab.get("variant"),
                        "n_q": lab.get("tokens")})
            if row["status"] == "ok":
                self.rate_ratios(row, b)
                row["tokens_per_s"] = b.get("tokens_per_second")
            rows.append(row)
        for b in self.gb.get("bench_rope", []):
            row = self.base_row(b, "bench_rope")
            a = name_args(b["name"])
            kind = b["name"].split("/")[0].removeprefix("BM_")
            row.update({"group": "rope_kernel", "encoder": "rope" if kind != "copy" else "memcpy", "variant": kind,
                        "n_q": a.get("tokens"), "mask": None})
            if "layout" in a:
                row["variant"] += f" {('half-split', 'interleaved')[a['layout']]} simd{a.get('simd', '')}"
            if row["status"] == "ok" and b.get("GBps"):
                row["gb_per_s"] = b["GBps"]
                self.set_ratio(row, "ratio_copy", b["GBps"] * 1e9, self.copy, self.copy_why)
            rows.append(row)
        for b in self.gb.get("bench_bias", []):
            row = self.base_row(b, "bench_bias")
            a = name_args(b["name"])
            enc = re.sub(r"^BM_|_tile(_steps)?", "", b["name"].split("/")[0])
            row.update({"group": "bias_tile", "encoder": enc, "n_q": a.get("tile"), "n_kv": a.get("tile"),
                        "variant": "position lists" if a.get("lists") else "position ranges"})
            if row["status"] == "ok" and b.get("bytes_per_second"):
                row["gb_per_s"] = b["bytes_per_second"] / 1e9
                self.set_ratio(row, "ratio_cache_copy", b["bytes_per_second"], self.cache_copy, self.cache_why)
            rows.append(row)
        rows += self.backward_rows()
        for p in self.probes:
            ok = p.get("status") == "ok"
            rows.append({
                "group": "memory_probe", "name": f"probe/{p['path']}/{p['encoder']}/{p['n']}", "path": p["path"],
                "encoder": p["encoder"], "mask": "causal" if p.get("causal") else "full", "n_q": p["n"],
                "n_kv": p["n"], "heads": p.get("heads"), "kv_heads": p.get("heads"), "d": p.get("d"),
                "status": p.get("status"), "time_s": p.get("seconds") if ok else None,
                "kernel_peak_bytes": p.get("heap_peak_bytes") if ok else None,
                "allocs_per_iter": p.get("allocations") if ok else None,
                "workspace_bytes": p.get("workspace_bytes") if ok else None, "input_bytes": p.get("input_bytes"),
                "rss_peak_bytes": p.get("rss_peak_bytes") if ok else None,
                "rss_growth_bytes": p["rss_peak_bytes"] - p["rss_start_bytes"] if ok else None,
                "source": "probe_memory"})
        for rec in self.ring:
            rows.append({
                "group": "ring", "name": f"ring/{rec.get('name', 'record')}/P{rec['_P']}", "source": "ring_bench",
                "status": "ok", "path": "ring", "heads": rec.get("heads"), "kv_heads": rec.get("kv_heads"),
                "d": rec.get("head_dim"), "n_q": rec.get("n_total"), "n_kv": rec.get("n_total"),
                "variant": " ".join(f"{k}={rec[k]}" for k in ("P", "layout", "query_blocks") if k in rec),
                "time_s": rec.get("step_time_s"), "rss_peak_bytes": rec.get("peak_rss_bytes_max"),
                "rss_growth_bytes": rec.get("rss_above_baseline_bytes_max"),
                "kernel_peak_bytes": rec.get("ring_bytes_max")})
        return rows

    def backward_rows(self):
        """bench_backward: group "backward" (no encoder, full and causal; path "backward" or "forward",
        the forward of the same shape) and "backward_encoder" (causal, each encoder). GFLOP/s count
        2.5x the forward's FLOP for the backward (FlashAttention's convention)."""
        rows = []
        for b in self.gb.get("bench_backward", []):
            if b["name"].startswith("posenc_bench::"):
                continue
            row = self.base_row(b, "bench_backward")
            lab = parse_label(b.get("label"))
            row.update({"group": "backward_encoder" if lab.get("group") == "encoder" else "backward",
                        "path": lab.get("pass"), "encoder": lab.get("enc"), "storage": "fp32"})
            row.update({k: lab.get(k) for k in ("mask", "n_q", "n_kv", "heads", "kv_heads", "d")})
            if row["status"] == "ok":
                self.rate_ratios(row, b)
                row.pop("gb_per_s", None)
                row.pop("ratio_copy", None)
                row["tokens_per_s"] = b.get("tokens_per_second")
                row["workspace_bytes"] = b.get("workspace_bytes")
            rows.append(row)
        return rows

    @staticmethod
    def speedups(rows):
        """speedup_vs_fp32 of every blockwise decode and storage point: the time of the fp32 point of
        the same group and shape over its own (per token: the two points run the same tokens)."""
        def key(r):
            return (r.get("group"), r.get("path"), r.get("encoder"), r.get("mask"), r.get("n_q"), r.get("n_kv"),
                    r.get("heads"), r.get("kv_heads"), r.get("d"), r.get("window"))
        fp32 = {key(r): r for r in rows if r.get("storage") == "fp32" and r.get("status") == "ok"}
        for r in rows:
            if (r.get("group") not in ("decode", "storage") or r.get("storage") == "fp32" or r.get("status") != "ok"
                    or not r.get("time_s")):
                continue
            base = fp32.get(key(r))
            if base and base.get("time_s"):
                r["speedup_vs_fp32"] = base["time_s"] / r["time_s"]

    # ---- serving (bench_serving: the engine step) ----

    def serving_rows(self):
        """One row per bench_serving point, group `serving_<point>` (decode, layout, multi_decode,
        mixed), `variant` its role. n_q and n_kv are the call's query tokens and cached keys over all
        its sequences. Ratios: GB/s of the visible K and V to the read bandwidth, GFLOP/s to the
        multiply-add peak, the time to the roofline (`roofline_times`), and the comparisons between
        points of the same run (`serving_comparisons`)."""
        rows = []
        for b in self.gb.get("bench_serving", []):
            row = self.base_row(b, "bench_serving")
            lab = parse_label(b.get("label"))
            row.update({"group": "serving_" + str(lab.get("point", "unknown")), "variant": lab.get("role"),
                        "storage": lab.get("storage"), "page_size": lab.get("page_size"), "encoder": lab.get("enc"),
                        "cache": lab.get("cache"), "seqs": lab.get("seqs"), "n_q": lab.get("tokens"),
                        "n_kv": lab.get("keys"), "q_min": lab.get("q_min"), "q_max": lab.get("q_max"),
                        "kv_min": lab.get("kv_min"), "kv_max": lab.get("kv_max"), "heads": lab.get("heads"),
                        "kv_heads": lab.get("kv_heads"), "d": lab.get("d"), "mask": "causal"})
            if row["status"] == "ok":
                self.rate_ratios(row, b)
                row.pop("ratio_copy", None)  # the step reads K and V and writes little: the read bandwidth
                if row.get("gb_per_s"):
                    self.set_ratio(row, "ratio_read", row["gb_per_s"] * 1e9, self.read, self.read_why)
                row["tokens_per_s"] = b.get("tokens_per_second")
                row["workspace_bytes"] = b.get("workspace_bytes")
                row["kv_bytes"] = b.get("kv_bytes")
                row["flop"] = b.get("flop")
                self.roofline(row)
            rows.append(row)
        self.serving_comparisons(rows)
        return rows

    def roofline(self, row):
        """The time the call cannot beat on this machine: the larger of its K/V bytes over the read
        bandwidth and its FLOP over the multiply-add peak (`roofline_bound` says which);
        ratio_roofline = that time over the measured one."""
        missing = [why for ceiling, why in ((self.read, self.read_why), (self.fma, self.fma_why)) if not ceiling]
        if missing:
            row["roofline_s"] = row["ratio_roofline"] = None
            row.setdefault("why", {})["ratio_roofline"] = "no ceiling: " + "; ".join(missing)
            return
        t_read = (row.get("kv_bytes") or 0) / self.read
        t_fma = (row.get("flop") or 0) / self.fma
        row["roofline_read_s"], row["roofline_fma_s"] = t_read, t_fma
        row["roofline_s"] = max(t_read, t_fma)
        row["roofline_bound"] = "read" if t_read >= t_fma else "FMA"
        row["ratio_roofline"] = row["roofline_s"] / row["time_s"] if row.get("time_s") else None

    @staticmethod
    def serving_comparisons(rows):
        """Ratios between serving points of the same run: speedup_vs_fp32 (the fp32 point of the same
        call over the point's time), vs_contiguous (a paged layout point's time over the contiguous
        one's) and vs_parts (a mixed step's time over the sum of its prefill-only and decode-only
        parts)."""
        def call(r, **change):
            k = {x: r.get(x) for x in ("group", "variant", "storage", "page_size", "encoder", "seqs", "n_q", "n_kv",
                                       "kv_min", "kv_max")}
            k.update(change)
            return tuple(sorted(k.items()))
        ok = {call(r): r for r in rows if r.get("status") == "ok" and r.get("time_s")}
        for r in rows:
            if r.get("status") != "ok" or not r.get("time_s"):
                continue
            if r.get("storage") != "fp32":
                base = ok.get(call(r, storage="fp32"))
                if base:
                    r["speedup_vs_fp32"] = base["time_s"] / r["time_s"]
            if r["group"] == "serving_layout" and r.get("page_size"):
                base = ok.get(call(r, page_size=0))
                if base:
                    r["vs_contiguous"] = r["time_s"] / base["time_s"]
            if r["group"] == "serving_mixed" and r.get("variant") == "step":
                parts = [x for x in rows if x.get("group") == "serving_mixed" and x.get("storage") == r.get("storage")
                         and x.get("variant") in ("prefill_only", "decode_only") and x.get("status") == "ok"
                         and x.get("time_s")]
                if len(parts) == 2:
                    r["vs_parts"] = r["time_s"] / sum(x["time_s"] for x in parts)
                    r["parts_s"] = {x["variant"]: x["time_s"] for x in parts}

    def select(self, **kw):
        return [r for r in self.rows if all(r.get(k) == v for k, v in kw.items())]

    # ---- ring (records from bench/mpi's ring_bench; the format is that program's) ----

    def load_ring(self):
        """Every record of ring_P<P>.json (a JSON array, or {"records": [...]}), flattened one level,
        with `_P` the ring size (the record's own `P`, else the file name's)."""
        recs = []
        for path in sorted(glob.glob(os.path.join(self.folder, "ring_P*.json"))):
            data = load_json(path)
            if data is None:
                continue
            items = data if isinstance(data, list) else data.get("records") or [data]
            for item in items:
                if not isinstance(item, dict):
                    continue
                flat = {}
                for k, v in item.items():
                    if isinstance(v, dict):
                        flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
                    else:
                        flat[k] = int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 53 else v
                flat["_P"] = int(flat.get("P", re.search(r"ring_P(\d+)\.json$", path).group(1)))
                recs.append(flat)
        return recs

    def ring_memory(self):
        """{measure: {P: bytes}} from the ring_memory records (per-rank figures, largest rank)."""
        out = {}
        for r in self.ring:
            if r.get("name", "ring_memory") != "ring_memory":
                continue
            for k, v in r.items():
                if isinstance(v, (int, float)) and re.search(r"bytes", k) and not k.endswith("_min"):
                    out.setdefault(k, {})[r["_P"]] = max(v, out.get(k, {}).get(r["_P"], 0))
        return out


# ---------------------------------------------------------------- plots

def plots(res, folder, inspect=None):
    """Writes the PNG plots into `folder`; returns their names. `inspect(name, figure)`, when given,
    sees each figure before it is saved (the tests check its axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    made = []

    def data_lines(ax):
        """The plotted series: not the ceilings' horizontal lines, which span the axes."""
        return [line for line in ax.get_lines() if line.get_transform() == ax.transData and len(line.get_xdata())]

    def padded(values, pad=0.1, min_pad=1.25, min_ratio=4.0):
        """Log-axis limits around `values`: `pad` of their span either side (at least a factor
        `min_pad`), widened to a factor `min_ratio` in all so that two ticks at least are labelled
        (a lone value gets a factor 2 either side)."""
        lo, hi = math.log(min(values)), math.log(max(values))
        p = max(pad * (hi - lo), math.log(min_pad), (math.log(min_ratio) - (hi - lo)) / 2)
        return math.exp(lo - p), math.exp(hi + p)

    def tidy(ax):
        """Every point inside the frame and clear of it, a lone point an octave from either edge (a
        quick run has many series of one size), single points drawn large enough to see."""
        lines = data_lines(ax)
        for line in lines:
            if len(line.get_xdata()) == 1:
                line.set_markersize(max(line.get_markersize(), 7))
        xs = [float(x) for line in lines for x in line.get_xdata() if x and x > 0]
        levels = [line.get_ydata()[0] for line in ax.get_lines() if line not in lines]  # ceilings stay in sight
        ys = [float(y) for y in levels + [y for line in lines for y in line.get_ydata()] if y and y > 0]
        if xs and ax.get_xscale() == "log":
            ax.set_xlim(*padded(xs))
        if ys and ax.get_yscale() == "log":
            ax.set_ylim(*padded(ys))

    def save(fig, name):
        for ax in fig.axes:
            tidy(ax)
        if inspect:
            inspect(name, fig)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=110)
        plt.close(fig)
        made.append(name)

    def legend(ax, **kw):
        if ax.get_legend_handles_labels()[0]:
            if any(len(line.get_xdata()) == 1 for line in data_lines(ax)):
                kw["loc"] = "best"  # lone points may sit in the corner a fixed legend would cover
            ax.legend(**kw)
    enc_names = ["none", "rope", "rope_linear", "rope_ntk", "rope_dynamic_ntk", "rope_yarn", "rope_llama3",
                 "rope_longrope", "alibi", "t5", "shaw", "sinusoidal"]
    # RoPE's policies in shades from blue to green (they share one kernel), the biases in warm colours.
    ropes = [e for e in enc_names if e.startswith("rope")]
    enc_color = {e: plt.get_cmap("winter")(i / (len(ropes) - 1)) for i, e in enumerate(ropes)}
    enc_color.update({"none": "black", "alibi": "tab:red", "t5": "tab:orange", "shaw": "tab:brown",
                      "sinusoidal": "tab:pink"})

    def n_axis(ax, label="sequence length n (tokens)"):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_n(v) if v >= 1 else ""))
        ax.set_xlabel(label)
        ax.grid(True, which="major", alpha=0.3)

    def bytes_axis(ax):
        """Log2 axis in KiB/MiB/GiB; call after plotting (the label step follows the range)."""
        ax.set_yscale("log", base=2)
        lo, hi = ax.get_ylim()
        octaves = math.log2(hi / lo) if lo > 0 else 30
        step = 1 if octaves <= 10 else 2 if octaves <= 22 else 4
        ax.yaxis.set_major_locator(LogLocator(base=2, numticks=60))
        ax.yaxis.set_major_formatter(FuncFormatter(
            lambda v, _: re.sub(r"\.0+ ", " ", fmt_bytes(v)) if v > 0 and round(math.log2(v)) % step == 0 else ""))
        ax.yaxis.set_minor_formatter(NullFormatter())

    def rate_axis(ax, label):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=30))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v, 2)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(label)

    def hline(ax, y, text, color, style):
        if not y:
            return
        ax.axhline(y, color=color, linestyle=style, linewidth=1.3)
        ax.annotate(text, xy=(0.01, y), xycoords=("axes fraction", "data"), xytext=(0, 3),
                    textcoords="offset points", color=color, fontsize=8, va="bottom")

    def series(rows, xkey, ykey):
        pts = sorted((r[xkey], r[ykey]) for r in rows if r.get(ykey) is not None and r.get(xkey))
        return [p[0] for p in pts], [p[1] for p in pts]

    def skip_marks(ax, skipped, y_of, label_once=True):
        done = False
        for r in skipped:
            m = re.search(r"would need ([\d.e+]+) GiB", r["status"] or "")
            if not m:
                continue
            y = y_of(r, float(m.group(1)))
            ax.plot([r["n_kv"]], [y], marker="x", color="red", markersize=9, mew=2, linestyle="none")
            if label_once and not done:
                ax.annotate(f"naive skipped at n={fmt_n(r['n_kv'])}:\n{r['status'].removeprefix('skipped: ')}",
                            xy=(r["n_kv"], y), xytext=(-12, 0), textcoords="offset points", ha="right",
                            va="center", fontsize=8, color="red")
                done = True

    # ---- throughput ----
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.2))
    ax = axes[0]
    variants = [("prefill", "full", "full", "tab:blue"), ("prefill", "causal", "causal", "tab:orange"),
                ("window", "window", "causal, window", "tab:green"), ("gqa", "causal", "causal GQA 8/2", "tab:purple")]
    any_line = False
    for group, mask, text, color in variants:
        for path, style, marker in (("blockwise", "-", "o"), ("naive", "--", "s")):
            rows = [r for r in res.select(group=group, path=path, mask=mask, status="ok") if r.get("d") == 128]
            xs, ys = series(rows, "n_kv", "gflops")
            if xs:
                wtxt = f" {fmt_n(rows[0]['window'])}" if group == "window" else ""
                ax.plot(xs, ys, linestyle=style, marker=marker, color=color, markersize=4,
                        label=f"{path}, {text}{wtxt}")
                any_line = True
                if path == "naive":
                    ax.annotate(f"naive stops\n(n={fmt_n(xs[-1])})" if group == "prefill" and mask == "full" else "",
                                xy=(xs[-1], ys[-1]), xytext=(6, -4), textcoords="offset points", fontsize=7,
                                color=color)
    hline(ax, res.fma and res.fma / 1e9, f"{res.fma_name} {fmt(res.fma / 1e9 if res.fma else 0)} GFLOP/s", "black",
          "-.")
    sg = res.sgemm_best(128)
    hline(ax, sg and sg / 1e9, f"Eigen SGEMM d=128 (built for this CPU) {fmt(sg / 1e9 if sg else 0)} GFLOP/s",
          "dimgray", ":")
    n_axis(ax)
    rate_axis(ax, "GFLOP/s (useful work, see report)")
    ax.set_title("Attention prefill, 8 heads, d = 128: blockwise (solid) vs naive (dashed)")
    if any_line:
        legend(ax, fontsize=7, loc="lower left", ncol=2)
    skip_marks(ax, [r for r in res.rows if r.get("group") in ("prefill",) and r.get("path") == "naive"
                    and (r.get("status") or "").startswith("skipped")], lambda r, g: res.fma / 1e9 * 0.8
               if res.fma else 1)

    ax = axes[1]
    for enc in enc_names:
        for path, style, marker in (("blockwise", "-", "o"), ("naive", "--", "s")):
            xs, ys = series(res.select(group="encoder", path=path, encoder=enc, status="ok"), "n_kv", "gflops")
            if xs:
                ax.plot(xs, ys, linestyle=style, marker=marker, markersize=3.5, color=enc_color[enc],
                        label=enc if path == "blockwise" else None, linewidth=1.2)
    hline(ax, res.fma and res.fma / 1e9, res.fma_name, "black", "-.")
    hline(ax, sg and sg / 1e9, "Eigen SGEMM d=128", "dimgray", ":")
    n_axis(ax)
    rate_axis(ax, "GFLOP/s")
    ax.set_title("Encoders inside causal prefill (8 heads, d = 128)\nblockwise solid, naive dashed")
    legend(ax, fontsize=7, loc="lower left", ncol=3, title="encoder (rotation inside the kernel)", title_fontsize=7)
    save(fig, "throughput.png")

    # ---- memory ----
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    ax = axes[0]
    probes = res.select(group="memory_probe")
    limit = (res.meta.get("mem_limit_gib") or 8) * GIB
    first_pts = {}
    for enc in enc_names:
        for path, style, marker in (("blockwise", "-", "o"), ("naive", "--", "s"), ("backward", ":", "^")):
            xs, ys = series([r for r in probes if r["encoder"] == enc and r["path"] == path and r["status"] == "ok"],
                            "n_kv", "rss_growth_bytes")
            if xs:
                ax.plot(xs, ys, linestyle=style, marker=marker, markersize=4, color=enc_color[enc],
                        label=f"{path}, {enc}")
                first_pts.setdefault(path, (xs[0], ys[0]))
    # Slope guides through the first points.
    xs_all = sorted({r["n_kv"] for r in probes})
    if xs_all:
        for path, k, text in (("blockwise", 1, "slope 1 (linear)"), ("naive", 2, "slope 2 (quadratic)")):
            x0, y0 = first_pts.get(path, (None, None))
            gx = [x for x in xs_all if x0 is not None and x >= x0]
            if len(gx) > 1:  # a slope needs two sizes
                gy = [y0 * (x / x0) ** k * (0.5 if k == 1 else 2.0) for x in gx]
                ax.plot(gx, gy, color="gray", linestyle=":", linewidth=1)
                ax.annotate(text, xy=(gx[-1], gy[-1]), xytext=(-4, 4), textcoords="offset points", ha="right",
                            fontsize=8, color="gray")
    hline(ax, limit, f"limit {limit / GIB:g} GiB (--mem-limit)", "red", "--")
    skip_marks(ax, [r for r in probes if r["path"] == "naive" and (r["status"] or "").startswith("skipped")],
               lambda r, g: g * GIB)
    n_axis(ax)
    bytes_axis(ax)
    shape = res.meta.get("probe_shape", {})
    ax.set_ylabel("peak RSS of a fresh process minus its RSS at start")
    ax.set_title(f"Peak resident memory, one process per point ({shape.get('heads', 1)} head, "
                 f"d = {shape.get('d', 128)}, causal)\nblockwise solid, naive dashed, backward dotted; the encoders' lines "
                 "coincide")
    if first_pts:
        legend(ax, fontsize=7, loc="lower right", ncol=2)

    ax = axes[1]
    any_line = False
    for enc in enc_names:
        for path, style, marker in (("blockwise", "-", "o"), ("naive", "--", "s")):
            # The encoder group, and for "none" the causal prefill group too (its naive path goes further).
            rows = [r for r in res.rows if r.get("encoder") == enc and r.get("path") == path
                    and r.get("status") == "ok" and (r.get("group") == "encoder" or (
                        r.get("group") == "prefill" and r.get("mask") == "causal" and r.get("d") == 128))]
            xs, ys = series(list({r["n_kv"]: r for r in rows}.values()), "n_kv", "kernel_peak_bytes")
            if xs:
                ax.plot(xs, ys, linestyle=style, marker=marker, markersize=4, color=enc_color[enc],
                        label=enc if path == "blockwise" else None)
                any_line = True
    n_axis(ax)
    bytes_axis(ax)
    ax.set_ylabel("peak of the kernel's own heap allocations")
    ax.set_title("The kernel's own heap peak (Google Benchmark MemoryManager)\ncausal prefill, 8 heads, d = 128: "
                 "blockwise solid, naive dashed")
    if any_line:
        legend(ax, fontsize=7, loc="upper left", ncol=3)
    save(fig, "memory.png")

    # ---- bandwidth-bound kernels ----
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.8))
    ax = axes[0]
    for n_q, color in ((1, "tab:blue"), (16, "tab:orange")):
        for storage, path, style, marker in (("fp32", "blockwise", "-", "o"), ("bf16", "blockwise", ":", "^"),
                                             ("fp16", "blockwise", "-.", "v"), ("fp32", "naive", "--", "s")):
            rows = [r for r in res.select(group="decode", path=path, storage=storage, status="ok")
                    if r.get("n_q") == n_q]
            xs, ys = series(rows, "n_kv", "gb_per_s")
            if xs:
                ax.plot(xs, ys, linestyle=style, marker=marker, markersize=5, color=color,
                        label=f"{path}, {storage} cache, {n_q} quer{'y' if n_q == 1 else 'ies'}")
    hline(ax, res.read and res.read / 1e9, f"read bandwidth {fmt(res.read / 1e9 if res.read else 0)} GB/s", "black",
          "-.")
    n_axis(ax, "tokens in the KV cache (n_kv)")
    rate_axis(ax, "GB/s of K and V read")
    ax.set_title("Decode against a KV cache (GQA 8/2, d = 128), K and V in fp32, bf16, fp16")
    legend(ax, fontsize=8, loc="lower left")

    ax = axes[1]
    for enc in enc_names:
        for variant, style, marker in (("cache", "-", "o"), ("direct", "--", "s"), ("add_to", "-", "D")):
            rows = [r for r in res.select(group="encoder_apply", encoder=enc, status="ok") if r["variant"] == variant]
            xs, ys = series(rows, "n_q", "gb_per_s")
            if xs:
                ax.plot(xs, ys, linestyle=style, marker=marker, markersize=4, color=enc_color.get(enc, "gray"),
                        label=f"{enc} ({variant})")
    hline(ax, res.copy and res.copy / 1e9, "copy bandwidth", "black", "-.")
    n_axis(ax, "tokens")
    rate_axis(ax, "GB/s read + written")
    ax.set_title("Encoders on their own: sinusoidal add, RoPE rotate per policy\n(cos/sin cache solid, direct angles dashed)")
    legend(ax, fontsize=7, loc="lower left", ncol=2)
    save(fig, "bandwidth.png")

    # ---- backward ----
    bwd = res.select(group="backward", status="ok")
    if bwd:
        fig, axes = plt.subplots(1, 2, figsize=(15, 5.8))
        ax = axes[0]
        for mask, color in (("full", "tab:blue"), ("causal", "tab:orange")):
            for pas, style, marker in (("backward", "-", "o"), ("forward", "--", "s")):
                xs, ys = series([r for r in bwd if r["mask"] == mask and r["path"] == pas], "n_kv", "gflops")
                if xs:
                    ax.plot(xs, ys, linestyle=style, marker=marker, markersize=4, color=color, label=f"{pas}, {mask}")
        hline(ax, res.fma and res.fma / 1e9, f"{res.fma_name} {fmt(res.fma / 1e9 if res.fma else 0)} GFLOP/s",
              "black", "-.")
        hline(ax, res.fma and res.fma / 1e9 * BACKWARD_GOAL, f"goal: {BACKWARD_GOAL} of the peak", "gray", ":")
        n_axis(ax)
        rate_axis(ax, "GFLOP/s (backward: 2.5x the forward's FLOP)")
        ax.set_title("Attention backward (solid) and forward (dashed), 8 heads, d = 128")
        legend(ax, fontsize=8, loc="lower left")
        ax = axes[1]
        probes = [r for r in res.select(group="memory_probe", path="backward") if r["status"] == "ok"]
        for enc in enc_names:
            xs, ys = series([r for r in probes if r["encoder"] == enc], "n_kv", "rss_growth_bytes")
            if xs:
                ax.plot(xs, ys, marker="^", markersize=4, color=enc_color[enc], label=enc)
        if probes:
            x0 = min(r["n_kv"] for r in probes)
            y0 = min(r["rss_growth_bytes"] for r in probes if r["n_kv"] == x0)
            gx = sorted({r["n_kv"] for r in probes})
            ax.plot(gx, [y0 * x / x0 * 0.5 for x in gx], color="gray", linestyle=":", linewidth=1)
            ax.annotate("slope 1 (linear)", xy=(gx[-1], y0 * gx[-1] / x0 * 0.5), xytext=(-4, 4),
                        textcoords="offset points", ha="right", fontsize=8, color="gray")
        n_axis(ax)
        bytes_axis(ax)
        ax.set_ylabel("peak RSS of a fresh process minus its RSS at start")
        ax.set_title("Backward peak resident memory, one process per point\n(1 head, d = 128, causal; "
                     "inputs and gradients included)")
        legend(ax, fontsize=8, loc="upper left")
        save(fig, "backward.png")

    # ---- ring ----
    mem = res.ring_memory()
    if mem:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        text = {"peak_rss_bytes_max": "peak RSS (ru_maxrss)",
                "rss_above_baseline_bytes_max": "peak RSS above the rank's RSS before the run",
                "ring_bytes_max": "held by the ring: shards, buffers, accumulators"}
        ps = sorted({p for v in mem.values() for p in v})
        for k, per_p in mem.items():
            pts = sorted(per_p.items())
            ax.plot([p for p, _ in pts], [y for _, y in pts], marker="o", label=text.get(k, k))
        ref = mem.get("ring_bytes_max") or next(iter(mem.values()))
        p0, y0 = min(ref.items())
        if len(ps) > 1:
            ax.plot(ps, [y0 * p0 / p for p in ps], color="gray", linestyle=":", label="1/P")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ps)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: str(int(v))))
        bytes_axis(ax)
        ax.set_xlabel("processes P")
        ax.set_ylabel("per process (largest rank)")
        total = next((r.get("n_total") for r in res.ring if r.get("name") == "ring_memory"), None)
        ax.set_title("Ring attention, P MPI processes on one machine: memory per process\nat a fixed total "
                     "length" + (f" ({fmt_n(total)} tokens, causal, zigzag)" if total else ""))
        ax.grid(True, alpha=0.3)
        legend(ax, fontsize=8)
        save(fig, "ring.png")
    return made


# ---------------------------------------------------------------- report

def headline(res):
    lines = []

    def best(rows, key):
        rows = [r for r in rows if r.get(key) is not None]
        return max(rows, key=lambda r: r["n_kv"] or 0) if rows else None

    for d in (128, 64):
        for mask in ("causal", "full"):
            r = best([r for r in res.select(group="prefill", path="blockwise", mask=mask, status="ok") if r["d"] == d],
                     "gflops")
            if r:
                sgemm = (f"{fmt_ratio(r['ratio_sgemm'])}x Eigen SGEMM built for this CPU"
                         if r.get("ratio_sgemm") is not None else
                         f"ratio to Eigen SGEMM: {ratio_cell(r, 'ratio_sgemm')}")
                lines.append(f"Blockwise {mask} prefill, n = {fmt_n(r['n_kv'])} (8 heads, d = {d}): {fmt(r['gflops'])} "
                             f"GFLOP/s {res.of_peak(r)}, {sgemm}")
        full = {r["n_kv"]: r for r in res.select(group="prefill", path="blockwise", mask="full", status="ok")
                if r["d"] == d}
        pairs = [(r["n_kv"], r["time_s"] / full[r["n_kv"]]["time_s"])
                 for r in res.select(group="prefill", path="blockwise", mask="causal", status="ok")
                 if r["d"] == d and r["n_kv"] in full and r["n_kv"] >= 4096]
        if pairs:
            lines.append(f"Causal time over full time, blockwise, d = {d}: "
                         + ", ".join(f"{fmt(q, 2)} at n = {fmt_n(n)}" for n, q in sorted(pairs)))
    naive = best([r for r in res.select(group="prefill", path="naive", mask="causal", status="ok") if r["d"] == 128],
                 "gflops")
    if naive:
        blk = [r for r in res.select(group="prefill", path="blockwise", mask="causal", status="ok")
               if r["d"] == 128 and r["n_kv"] == naive["n_kv"]]
        speed = f"; blockwise is {fmt(blk[0]['gflops'] / naive['gflops'], 2)}x faster there" if blk else ""
        lines.append(f"Naive causal prefill, n = {fmt_n(naive['n_kv'])}: {fmt(naive['gflops'])} GFLOP/s "
                     f"{res.of_peak(naive)}{speed}")
    enc_rows = res.select(group="encoder", path="blockwise", status="ok")
    if enc_rows:
        n = max(r["n_kv"] for r in enc_rows)
        at = {r["encoder"]: r for r in enc_rows if r["n_kv"] == n}
        if "none" in at:
            costs = ", ".join(f"{e} {100 * (at[e]['time_s'] / at['none']['time_s'] - 1):+.0f}%"
                              for e in ("rope", "rope_llama3", "alibi", "t5", "shaw") if e in at)
            lines.append(f"Encoders inside causal blockwise prefill at n = {fmt_n(n)}, time against none: {costs}")
    for group, text in (("window", "Sliding-window (causal)"), ("gqa", "GQA 8/2 causal")):
        r = best(res.select(group=group, path="blockwise", status="ok"), "gflops")
        if r:
            extra = f", window {fmt_n(r['window'])}" if group == "window" else ""
            lines.append(f"{text} prefill, n = {fmt_n(r['n_kv'])}{extra}: {fmt(r['gflops'])} GFLOP/s "
                         f"{res.of_peak(r)}")
    for storage in ("fp32", "bf16", "fp16"):
        dec = best([r for r in res.select(group="decode", path="blockwise", storage=storage, status="ok")
                    if r["n_q"] == 1], "gb_per_s")
        if dec:
            speed = (f"; per token {fmt_ratio(dec['speedup_vs_fp32'])}x the fp32 cache"
                     if storage != "fp32" and dec.get("speedup_vs_fp32") else "")
            lines.append(f"Decode, 1 query against {fmt_n(dec['n_kv'])} cached tokens in {storage} (GQA 8/2, "
                         f"d = 128): {fmt(dec['gb_per_s'])} GB/s of K and V = {ratio_cell(dec, 'ratio_read')} of the "
                         f"read bandwidth{speed}")
    st = [r for r in res.select(group="storage", path="blockwise", status="ok") if r["storage"] in ("bf16", "fp16")]
    if st:
        n = max(r["n_kv"] for r in st)
        parts = [f"{r['storage']} {100 * (1 / r['speedup_vs_fp32'] - 1):+.0f}%" for r in st
                 if r["n_kv"] == n and r.get("speedup_vs_fp32")]
        if parts:
            lines.append(f"Causal GQA 8/2 prefill at n = {fmt_n(n)}, time of half-precision storage against fp32: "
                         + ", ".join(parts))
    gains = bf16_qk_gains(res)
    if gains:
        g = gains[-1]
        lines.append(f"bf16 Q K^T products (`bf16_qk`, {g[2]}) in causal GQA 8/2 prefill at n = {fmt_n(g[1])} on "
                     f"a bf16 cache: {fmt_ratio(g[0])}x the speed of float products")
    lines += serving_headline(res)
    rope = [r for r in res.select(group="encoder_apply", encoder="rope", variant="cache", status="ok")]
    if rope:
        r = max(rope, key=lambda r: r["n_q"])
        lines.append(f"RoPE rotate with a cos/sin cache, {fmt_n(r['n_q'])} tokens x 32 heads x 128: "
                     f"{fmt(r['gb_per_s'])} GB/s = {ratio_cell(r, 'ratio_copy')}x the copy bandwidth")
    lines += backward_headline(res)
    probes = res.select(group="memory_probe", encoder="none")
    if probes:
        parts = []
        for path in ("blockwise", "naive", "backward"):
            ok = sorted((r["n_kv"], r["rss_growth_bytes"]) for r in probes if r["path"] == path and r["status"] == "ok")
            s = slope(ok[-4:])
            if s is not None:
                parts.append(f"{path} slope {s:.2f} (to {fmt_bytes(ok[-1][1])} at n = {fmt_n(ok[-1][0])})")
        skipped = sorted((r["n_kv"], r["status"]) for r in probes if r["path"] == "naive"
                         and (r["status"] or "").startswith("skipped"))
        if skipped:
            parts.append(f"naive skipped from n = {fmt_n(skipped[0][0])} ({skipped[0][1].removeprefix('skipped: ')})")
        lines.append("Peak RSS of a fresh process against n (log-log): " + "; ".join(parts))
    mem = res.ring_memory()
    key = next((k for k in ("rss_above_baseline_bytes_max", "ring_bytes_max", "peak_rss_bytes_max") if k in mem), None)
    if key:
        total = next((r.get("n_total") for r in res.ring if r.get("name") == "ring_memory"), None)
        what = {"rss_above_baseline_bytes_max": "peak RSS above its RSS before the run",
                "ring_bytes_max": "bytes the ring holds", "peak_rss_bytes_max": "peak RSS"}[key]
        lines.append(f"Ring attention{' at n = ' + fmt_n(total) if total else ''}, per-process {what} (largest rank) "
                     "against P: " + ", ".join(f"P={p}: {fmt_bytes(b)}" for p, b in sorted(mem[key].items())))
    hidden = [r for r in res.ring if r.get("name") == "ring_step" and r.get("query_blocks") == 16 and r["_P"] > 1]
    if hidden:
        hidden = sorted(hidden, key=lambda r: r["_P"])
        lines.append("Ring transfer hidden behind compute (query_blocks = 16): " +
                     ", ".join(f"P={r['_P']}: {fmt_ratio(r.get('transfer_hidden_share'), 'not recorded')}"
                               for r in hidden) + ". " + ring_hidden_note(res, hidden))
    bal = {(r["_P"], r.get("layout")): r.get("compute_ratio") for r in res.ring if r.get("name") == "ring_balance"}
    if bal:
        pmax = max(p for p, _ in bal)
        lines.append(f"Causal work balance at P={pmax}, slowest/fastest rank compute: zigzag "
                     f"{fmt_ratio(bal.get((pmax, 'zigzag')), 'not measured')}, "
                     f"contiguous {fmt_ratio(bal.get((pmax, 'contiguous')), 'not measured')}")
    return lines


def ring_hidden_note(res, recs):
    """What the hidden share of ring_step records (bench/mpi/ring_bench.cpp) measures, and the
    figures behind it in this run."""
    note = ("The share is 1 − (the slowest rank's wait for the transfers after its compute) / (the same "
            "transfers timed with no compute), clamped to [0, 1]: 0 means the slowest rank waited after its "
            "compute at least as long as the transfers take alone. Measured: ")
    parts = []
    cpus = res.meta.get("cpus")
    for r in recs:
        p = r["_P"]
        text = f"P={p}:"
        if r.get("wait_s") is not None and r.get("transfer_s") is not None:
            text += (f" the slowest rank waited {fmt_time(r['wait_s'])} after compute, the transfers alone take "
                     f"{fmt_time(r['transfer_s'])}")
        done = r.get("transfers_done_during_compute")
        if done is not None and p > 1:
            text += f", transfers done by the end of compute {round(done * (p - 1))} of {p - 1} (rank with fewest)"
        if cpus and p > cpus:
            text += f", {p} ranks on {cpus} CPUs (a rank's wait also counts time its neighbours spent off the CPU)"
        parts.append(text)
    env = res.meta.get("env") or {}
    depth = [env.get(f"OMPI_MCA_pml_ob1_{k}_pipeline_depth") for k in ("send", "recv")]
    mpi = (f"Open MPI pipeline depth {depth[0] or 'default'} (send), {depth[1] or 'default'} (recv)" if any(depth)
           else "Open MPI's default pipeline depth")
    return (note + "; ".join(parts) + f". Run with {mpi}; docs/ring_attention.md (hidden transfer) measures "
            "the share with deeper pipelines.")


def machine_section(res):
    m = res.meta
    env = m.get("env", {})
    env_text = ", ".join(f"`{k}={v}`" if v is not None else f"`{k}` unset" for k, v in env.items()) or "none"
    rows = [
        ("CPU", f"{m.get('cpu_model', '?')}, {m.get('cpus', '?')} logical CPUs"
                f"{', ' + str(m['threads_per_core']) + ' thread(s) per core' if m.get('threads_per_core') else ''}"
                f"{', hypervisor ' + m['hypervisor'] if m.get('hypervisor') else ''}"),
        ("CPU flags (SIMD)", " ".join(m.get("cpu_flags", [])) or "?"),
        ("kernels' instruction set", simd_text(res)),
        ("caches", ", ".join(f"{k} {v}" for k, v in m.get("caches", {}).items()) or "?"),
        ("memory", f"{m.get('memory_gib', '?')} GiB"),
        ("kernel, governor", f"Linux {m.get('kernel', '?')}, {m.get('governor') or 'no cpufreq governor exposed'}"),
        ("compiler", m.get("compiler", "?")),
        ("build", f"{m.get('build_type', '?')}, flags `{m.get('compile_flags', '')}`"),
        ("threads", m.get("threads", "a posenc::thread_pool of one worker per hardware thread")),
        ("Eigen", m.get("eigen", "?")),
        ("Google Benchmark", m.get("google_benchmark", "?")),
        ("environment", env_text),
        ("commit", f"`{m.get('commit', '?')}`"),
        ("run", f"{m.get('date', '?')} on {m.get('host', '?')}, mode `{m.get('mode', '?')}`, "
                f"{fmt(m.get('run_seconds', 0) / 60, 2)} min after the build, min time per point "
                f"{m.get('min_time_s', '?')} s"
                f"{best_of_text(m)}, memory limit {m.get('mem_limit_gib', '?')} GiB"
                f"{', filter `' + m['filter'] + '`' if m.get('filter') else ''}"),
        ("load average", f"{' '.join(m.get('load_average_start', []))} at start, "
                         f"{' '.join(m.get('load_average_end', []))} at end"),
    ]
    return md_table(["", ""], [(f"**{a}**", b) for a, b in rows])


def best_of_text(m):
    """How the points a goal compares closely were run (bench/run.py BEST_OF_GROUPS)."""
    n, points = m.get("best_of", 1), m.get("best_of_points") or []
    if not n or n <= 1 or not points:
        return ""
    return f"; {', '.join(points)}: the fastest of {n} repetitions run in a random interleaving"


def best_of_goals_text(m):
    n, points = m.get("best_of", 1), m.get("best_of_points") or []
    if not n or n <= 1 or not points:
        return ""
    return (f" The points of {', '.join(points)} are each the fastest of {n} repetitions, run in a random "
            "interleaving in one process.")


def simd_text(res):
    """'AVX2+FMA in use, the CPU has AVX-512, POSENC_SIMD_CAP = avx2'."""
    info, simd = res.fma_info, res.meta.get("simd") or {}
    isa = info.get("isa") or simd.get("in_use")
    if not isa:
        return "instruction set not recorded"
    parts = [f"{ISA_NAMES.get(isa, isa)} in use"]
    detected = info.get("detected") or simd.get("detected")
    if detected:
        parts.append(f"the CPU has {ISA_NAMES.get(detected, detected)}")
    cap = info.get("cap") or simd.get("cap")
    if cap:
        parts.append(f"POSENC_SIMD_CAP = {cap}" if cap != "none" else "no POSENC_SIMD_CAP")
    return ", ".join(parts)


def ceilings_section(res):
    def drift(a, b):
        return f"{100 * (b / a - 1):+.0f}%" if a and b else "n/a (one measurement)"

    def cell(x, scale, unit, why, other):
        if x:
            return f"{fmt(x / scale)} {unit}"
        return "not measured" if other else "no ceiling: " + why

    info = res.fma_info
    fma_row = peak_base(info) + (f", {info['threads']} threads" if info.get("threads") else "")
    if info.get("lanes"):
        fma_row += f" ({info['lanes']}-lane {info.get('op', 'fma')}, {info.get('chains', 12)} chains per thread)"
    rows = [
        (fma_row, "GFLOP/s", res.fma_start, res.fma_end, 1e9, res.fma_why),
        ("copy bandwidth, 256 MiB (DRAM), read + write", "GB/s", res.copy_start, res.copy_end, 1e9, res.copy_why),
        ("copy bandwidth, 512 KiB (cache), read + write", "GB/s", res.cache_start, res.cache_end, 1e9,
         res.cache_why),
        ("read bandwidth, 256 MiB (DRAM), read only", "GB/s", res.read_start, res.read_end, 1e9, res.read_why),
    ]
    table = [(name, cell(a, s, unit, why, b), cell(b, s, unit, why, a), drift(a, b))
             for name, unit, a, b, s, why in rows]
    for (n, d), v in sorted(res.sgemm.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        table.append((f"Eigen SGEMM, S = QK^T and O = PV, n = {fmt_n(n)}, d = {d} (-march=native)",
                      f"{fmt(v / 1e9)} GFLOP/s", "not rerun", "n/a (one measurement)"))
    if not res.sgemm:
        table.append(("Eigen SGEMM (-march=native)", "no ceiling: " + res.sgemm_why, "not rerun",
                      "n/a (one measurement)"))
    text = md_table(["ceiling", "start of run", "end of run", "drift"], table)
    text += (f"\n\nThe multiply-add peak is measured with the instruction set the attention kernels ran with "
             f"({simd_text(res)}), on as many threads as the attention calls use.")
    spread = [abs(a / b - 1) for _, _, a, b, _, _ in rows if a and b]
    if spread and max(spread) > 0.10:
        text += ("\n\n**The ceilings moved by more than 10% during the run: the machine was not quiet, so "
                 "ratios are approximate.**")
    text += ("\n\nRatios use the higher of the two measurements. The Eigen SGEMM ratio of an attention point "
             "uses the SGEMM of its head_dim at the nearest measured n.")
    return text


def storage_text(r):
    """'bf16 storage'; for bf16_qk points 'bf16 storage, bf16 Q K^T (vdpbf16ps)'."""
    if r.get("storage") == "bf16_qk":
        return f"bf16 storage, bf16 Q K^T ({r.get('variant') or 'float kernels'})"
    return f"{r.get('storage')} storage"


def bf16_qk_gains(res):
    """(bf16 time / bf16_qk time, n, kernels) of every causal GQA prefill point of bf16_qk beside a
    bf16 one of the same n: the gain of bf16 Q K^T products over float products on the same cache."""
    bf16 = {r["n_kv"]: r for r in res.select(group="storage", path="blockwise", storage="bf16", status="ok")}
    out = []
    for r in res.select(group="storage", path="blockwise", storage="bf16_qk", status="ok"):
        b = bf16.get(r["n_kv"])
        if b and b.get("time_s") and r.get("time_s"):
            out.append((b["time_s"] / r["time_s"], r["n_kv"], r.get("variant") or "float kernels"))
    return sorted(out, key=lambda g: g[1])


def prefill_section(res):
    rows = []
    for group in ("prefill", "window", "gqa", "storage"):
        for r in sorted(res.select(group=group), key=lambda r: (r["d"] or 0, r["mask"] or "", r["n_kv"] or 0,
                                                                 r["path"] or "")):
            what = {"prefill": r["mask"], "window": f"causal, window {fmt_n(r['window'] or 0)}",
                    "gqa": f"causal, GQA {r['heads']}/{r['kv_heads']}",
                    "storage": f"causal, GQA {r['heads']}/{r['kv_heads']}, {storage_text(r)}"}[group]
            rows.append((what, r["d"], fmt_n(r["n_kv"]), r["path"], fmt_time(r.get("time_s")),
                         fmt(r.get("tokens_per_s")), fmt(r.get("gflops")), ratio_cell(r, "ratio_fma"),
                         ratio_cell(r, "ratio_sgemm"), fmt_bytes(r.get("kernel_peak_bytes")),
                         status_cell(r)))
    return md_table(["attention", "d", "n", "path", "time", "tokens/s", "GFLOP/s", f"x {res.fma_name}",
                     "x Eigen SGEMM", "kernel heap peak", "status"], rows)


def encoder_section(res):
    rows = res.select(group="encoder")
    if not rows:
        return "_No encoder points in this run._"
    ns = sorted({r["n_kv"] for r in rows})
    encs = []
    for r in rows:
        if r["encoder"] not in encs:
            encs.append(r["encoder"])
    out = []
    for path in ("blockwise", "naive"):
        table = []
        for e in encs:
            cells = []
            for n in ns:
                hit = [r for r in rows if r["encoder"] == e and r["path"] == path and r["n_kv"] == n]
                if not hit:
                    cells.append("not run")
                elif hit[0]["status"] != "ok":
                    cells.append(hit[0]["status"])
                else:
                    cells.append(f"{fmt(hit[0]['gflops'])} ({ratio_cell(hit[0], 'ratio_fma')})")
            if any(c != "not run" for c in cells):
                table.append([e] + cells)
        if table:
            out.append(f"**{path}** — GFLOP/s (ratio to the {res.fma_name}):\n\n" +
                       md_table(["encoder"] + [f"n = {fmt_n(n)}" for n in ns], table))
    return "\n\n".join(out)


def decode_section(res):
    order = {"fp32": 0, "bf16": 1, "fp16": 2}
    rows = []
    for r in sorted(res.select(group="decode"), key=lambda r: (r["n_q"], r["n_kv"], r["path"],
                                                               order.get(r.get("storage"), 3))):
        speed = (fmt_ratio(r["speedup_vs_fp32"]) if r.get("speedup_vs_fp32") else
                 "" if r.get("storage") == "fp32" else "not run" if r.get("status") != "ok" else "no fp32 point")
        roof = (f"{fmt_time(r['roofline_s'])} ({r['roofline_bound']})" if r.get("roofline_s") is not None else
                ratio_cell(r, "ratio_roofline") if r.get("status") == "ok" else "")
        rows.append((fmt_n(r["n_kv"]), r["n_q"], r.get("storage") or "fp32", r["path"], fmt_time(r.get("time_s")),
                     fmt(r.get("gb_per_s")), ratio_cell(r, "ratio_read"), fmt(r.get("gflops")),
                     ratio_cell(r, "ratio_fma"), roof, ratio_cell(r, "ratio_roofline"), speed,
                     fmt(r.get("tokens_per_s")), fmt_bytes(r.get("kernel_peak_bytes")), status_cell(r)))
    return ("The roofline is the time a call cannot beat here: the larger of its K/V bytes over the read bandwidth "
            f"and its FLOP over the {res.fma_name} (which one binds in brackets); the ratio is the roofline's time "
            "over the measured one.\n\n" +
            md_table(["n_kv", "n_q", "K/V storage", "path", "time", "GB/s of K+V", "x read bandwidth", "GFLOP/s",
                      f"x {res.fma_name}", "roofline (bound)", "x roofline", "per-token speed-up over fp32",
                      "tokens/s", "kernel heap peak", "status"], rows))


# The engine step's goals (docs/benchmarks.md, "Serving").
SERVING_GOALS = {"read": 0.70, "half_speedup": 2.0, "layout": 1.10, "roofline": 0.60, "mixed": 1.15}


def goal_cell(value, goal, at_least, why):
    """`met` or `missed by X` for a figure against its goal (at least, or at most, `goal`); `why`
    when there is no figure."""
    if value is None:
        return why
    if (value >= goal) if at_least else (value <= goal):
        return "met"
    gap = abs(value - goal)
    return f"missed by {gap:.2f}" if gap >= 0.005 else f"missed by {gap:.2g}"


def lengths_text(r):
    lo, hi = r.get("kv_min"), r.get("kv_max")
    if lo is None or hi is None:
        return "?"
    return fmt_n(lo) if lo == hi else f"{fmt_n(lo)}-{fmt_n(hi)}"


def layout_text(r):
    return "contiguous" if r.get("page_size") == 0 else f"pages of {r.get('page_size')}"


def serving_compare_cell(r, key, missing):
    """A comparison between points of the run (vs_contiguous, vs_parts, speedup_vs_fp32): the figure,
    `not run` for a point that did not run, else `missing` (the point it needs is not in the run)."""
    if r.get(key) is not None:
        return fmt_ratio(r[key])
    return "not run" if r.get("status") != "ok" else missing


def serving_section(res):
    rows = [r for r in res.rows if (r.get("group") or "").startswith("serving_")]
    if not rows:
        return "_No serving points in this run (bench_serving not built, or filtered out)._"
    threads = res.fma_info.get("threads") or res.meta.get("cpus") or "?"
    read = f"{fmt(res.read / 1e9)} GB/s" if res.read else "no ceiling: " + res.read_why
    peak = f"{fmt(res.fma / 1e9)} GFLOP/s" if res.fma else "no ceiling: " + res.fma_why
    order = {"fp32": 0, "bf16": 1, "fp16": 2}
    parts = [
        f"One call per iteration on the benchmarks' thread pool ({threads} threads), GQA 32/8, d = 128, causal, a "
        "reused attention_workspace. Caches are filled by paged_append, pages in a shuffled order; the decode, "
        "multi-token and mixed points keep keys rotated with Llama 3's RoPE (`cached_keys::rotated`: the call "
        "rotates only the queries), the layout points run with no encoder. GB/s counts the cached K and V the "
        "call must read (every cached token is visible to its sequence's last query); ratios are to the "
        f"ceilings of this run: read bandwidth {read}, {res.fma_name} {peak}."]

    dec = sorted(res.select(group="serving_decode"), key=lambda r: order.get(r.get("storage"), 3))
    table = []
    for r in dec:
        speed = ("" if r.get("storage") == "fp32" else serving_compare_cell(r, "speedup_vs_fp32", "no fp32 point"))
        table.append((r.get("storage"), layout_text(r), r.get("seqs"), lengths_text(r), fmt_time(r.get("time_s")),
                      fmt(r.get("gb_per_s")), ratio_cell(r, "ratio_read"),
                      goal_cell(r.get("ratio_read"), SERVING_GOALS["read"], True, ratio_cell(r, "ratio_read")),
                      speed, fmt(r.get("tokens_per_s")), fmt(r.get("allocs_per_iter"), 2), status_cell(r)))
    parts.append("**Batched decode**: one query per sequence. Goal: at least "
                 f"{SERVING_GOALS['read']:.2f} of the read bandwidth; a bf16 or fp16 cache about "
                 f"{SERVING_GOALS['half_speedup']:.0f}x fp32 per token.\n\n" + (md_table(
                     ["K/V storage", "layout", "sequences", "cache lengths", "time", "GB/s of K+V",
                      "x read bandwidth", "goal (read)", "per-token speed-up over fp32", "tokens/s",
                      "allocations per call", "status"], table) if table else "_Not in this run._"))

    lay = sorted(res.select(group="serving_layout"),
                 key=lambda r: (r.get("variant") or "", order.get(r.get("storage"), 3), -(r.get("page_size") or 1e9)))
    table = []
    for r in lay:
        vs = "" if r.get("page_size") == 0 else serving_compare_cell(r, "vs_contiguous", "no contiguous point")
        # A plain read has no goal: it shows what the layout costs the memory itself.
        goal = ("" if r.get("page_size") == 0 or r.get("variant") == "read" else
                goal_cell(r.get("vs_contiguous"), SERVING_GOALS["layout"], False, vs))
        what = (f"decode, {r.get('seqs')} sequences of {lengths_text(r)}" if r.get("variant") == "decode" else
                f"no attention: the decode batch's K and V read in decode's order" if r.get("variant") == "read" else
                f"causal prefill, {r.get('seqs')} x {fmt_n(r.get('q_max') or 0)} tokens")
        table.append((what, r.get("storage"), layout_text(r), fmt_time(r.get("time_s")), fmt(r.get("gb_per_s")),
                      ratio_cell(r, "ratio_read"), fmt(r.get("gflops")), ratio_cell(r, "ratio_fma"), vs, goal,
                      status_cell(r)))
    parts.append("**Paged against contiguous keys** (no encoder; contiguous: `attention_varlen` over the keys of "
                 "each sequence in consecutive rows; a plain read of the same bytes in the same order shows what "
                 "the layout costs the memory itself). Goal: a paged call within "
                 f"{100 * (SERVING_GOALS['layout'] - 1):.0f}% of the contiguous one.\n\n" + (md_table(
                     ["call", "K/V storage", "layout", "time", "GB/s of K+V", "x read bandwidth", "GFLOP/s",
                      f"x {res.fma_name}", "time / contiguous", "goal (time)", "status"], table)
                     if table else "_Not in this run._"))

    multi = sorted(res.select(group="serving_multi_decode"),
                   key=lambda r: (r.get("kv_max") or 0, order.get(r.get("storage"), 3), r.get("q_max") or 0))
    table = []
    for r in multi:
        roof = (f"{fmt_time(r['roofline_s'])} ({r['roofline_bound']})" if r.get("roofline_s") is not None else
                ratio_cell(r, "ratio_roofline"))
        table.append((f"{r.get('seqs')} x {fmt_n(r.get('kv_max') or 0)}", r.get("q_max"), r.get("storage"),
                      fmt_time(r.get("time_s")), fmt(r.get("gb_per_s")), ratio_cell(r, "ratio_read"),
                      fmt(r.get("gflops")), ratio_cell(r, "ratio_fma"), roof, ratio_cell(r, "ratio_roofline"),
                      goal_cell(r.get("ratio_roofline"), SERVING_GOALS["roofline"], True,
                                ratio_cell(r, "ratio_roofline")), status_cell(r)))
    parts.append("**Multi-token decode** (speculative decoding), pages of 16. Roofline: the larger of the K/V "
                 "bytes over the read bandwidth and 4 · d · heads · (visible query-key pairs) FLOP over the "
                 f"{res.fma_name}; the ratio is the roofline's time over the measured one. Goal: at least "
                 f"{SERVING_GOALS['roofline']:.2f}.\n\n" + (md_table(
                     ["sequences x cached tokens", "query tokens per sequence", "K/V storage", "time", "GB/s of K+V",
                      "x read bandwidth", "GFLOP/s", f"x {res.fma_name}", "roofline (bound)", "x roofline",
                      "goal (roofline)", "status"], table) if table else "_Not in this run._"))

    roles = {"step": 0, "prefill_only": 1, "decode_only": 2}
    mixed = sorted(res.select(group="serving_mixed"),
                   key=lambda r: (order.get(r.get("storage"), 3), roles.get(r.get("variant"), 3)))
    table = []
    for r in mixed:
        what = {"step": "the step, one call", "prefill_only": "its prefill chunks alone",
                "decode_only": "its decode tokens alone"}.get(r.get("variant"), r.get("variant"))
        if r.get("variant") == "step":
            vs = serving_compare_cell(r, "vs_parts", "a part is not in this run")
            goal = goal_cell(r.get("vs_parts"), SERVING_GOALS["mixed"], False, vs)
        else:
            vs = goal = ""
        table.append((r.get("storage"), what, r.get("seqs"), r.get("n_q"), lengths_text(r),
                      fmt_time(r.get("time_s")), fmt(r.get("gflops")), ratio_cell(r, "ratio_fma"),
                      fmt(r.get("gb_per_s")), ratio_cell(r, "ratio_read"), vs, goal,
                      fmt(r.get("allocs_per_iter"), 2), status_cell(r)))
    parts.append("**Mixed step**: two prompts' prefill chunks (the first chunk of one, the second of the other) and "
                 "decode tokens, in one call, against the same cache's prefill chunks alone plus its decode tokens "
                 "alone. Goal: the step within "
                 f"{100 * (SERVING_GOALS['mixed'] - 1):.0f}% of the sum of its parts.\n\n" + (md_table(
                     ["K/V storage", "call", "sequences", "query tokens", "cache lengths", "time", "GFLOP/s",
                      f"x {res.fma_name}", "GB/s of K+V", "x read bandwidth", "time / (prefill + decode alone)",
                      "goal (time)", "allocations per call", "status"], table) if table else "_Not in this run._"))
    return "\n\n".join(parts)


def serving_headline(res):
    """Headline lines of the serving points: each figure with its ratio or why there is none."""
    lines = []
    dec = {r.get("storage"): r for r in res.select(group="serving_decode")}
    ok = [dec[s] for s in ("fp32", "bf16", "fp16") if s in dec and dec[s].get("status") == "ok"]
    if ok:
        r0 = ok[0]
        parts = []
        for r in ok:
            text = f"{r['storage']} {fmt(r.get('gb_per_s'))} GB/s ({ratio_cell(r, 'ratio_read')} of the read bandwidth"
            if r.get("speedup_vs_fp32") is not None:
                text += f", {fmt_ratio(r['speedup_vs_fp32'])}x fp32 per token"
            parts.append(text + ")")
        lines.append(f"Serving, batched decode of {r0.get('seqs')} sequences ({lengths_text(r0)} cached tokens, "
                     f"GQA 32/8, {layout_text(r0)}): " + ", ".join(parts))
    lay = [r for r in res.select(group="serving_layout") if r.get("vs_contiguous") is not None]
    if lay:
        lines.append("Serving, paged time over contiguous: " + ", ".join(
            f"{r['variant']} {r['storage']} pages of {r['page_size']} {fmt_ratio(r['vs_contiguous'])}"
            for r in sorted(lay, key=lambda r: (r["variant"], r["storage"], r["page_size"]))))
    multi = [r for r in res.select(group="serving_multi_decode", status="ok")]
    if multi:
        lines.append("Serving, multi-token decode against the roofline: " + ", ".join(
            f"{r['storage']} {r.get('seqs')} x {fmt_n(r.get('kv_max') or 0)}, {r.get('q_max')} tokens "
            f"{ratio_cell(r, 'ratio_roofline')}"
            for r in sorted(multi, key=lambda r: (r.get("kv_max") or 0, r["storage"], r.get("q_max") or 0))))
    mixed = [r for r in res.select(group="serving_mixed", variant="step") if r.get("vs_parts") is not None]
    if mixed:
        lines.append("Serving, mixed step over its parts run alone: " + ", ".join(
            f"{r['storage']} {fmt_ratio(r['vs_parts'])}" for r in mixed))
    return lines


def workspace_section(res):
    rows = []
    for r in sorted(res.rows, key=lambda r: (r.get("n_kv") or 0, r.get("group") or "")):
        if r.get("group") in ("workspace_reused", "workspace_per_call"):
            rows.append((fmt_n(r["n_kv"]), "reused" if r["group"] == "workspace_reused" else "allocated per call",
                         fmt_time(r.get("time_s")), fmt(r.get("gflops")), ratio_cell(r, "ratio_fma"),
                         fmt(r.get("allocs_per_iter"), 2), fmt_bytes(r.get("kernel_peak_bytes")),
                         fmt_bytes(r.get("workspace_bytes"))))
    return md_table(["n", "workspace", "time", "GFLOP/s", f"x {res.fma_name}", "allocations per call",
                     "kernel heap peak", "attention_workspace_bytes"], rows)


def apply_section(res):
    rows = []
    for r in res.select(group="encoder_apply"):
        rows.append((r["encoder"], r["variant"], fmt_n(r["n_q"]), fmt_time(r.get("time_s")), fmt(r.get("gb_per_s")),
                     ratio_cell(r, "ratio_copy"), fmt(r.get("tokens_per_s")),
                     fmt_bytes(r.get("kernel_peak_bytes")), status_cell(r)))
    return md_table(["encoder", "variant", "tokens", "time", "GB/s", "x copy bandwidth", "tokens/s",
                     "kernel heap peak", "status"], rows)


def rope_section(res):
    rows = []
    for b in res.gb.get("bench_rope", []):
        if b.get("error_occurred"):
            continue
        a = name_args(b["name"])
        kind = b["name"].split("/")[0].removeprefix("BM_")
        layout = ("half-split", "interleaved")[a["layout"]] if "layout" in a else ""
        simd = ("portable", "AVX2", "AVX-512")[a["simd"]] if "simd" in a else ""
        to_copy = (fmt_ratio(b["GBps"] * 1e9 / res.copy) if res.copy and b.get("GBps") else
                   "no figure" if res.copy else "no ceiling: " + res.copy_why)
        rows.append((kind, fmt_n(a.get("tokens", 0)), layout, simd, fmt(b.get("GBps")), fmt_ratio(b.get("ratio")),
                     fmt_ratio(b.get("ratio_inplace")), to_copy))
    return md_table(["kernel", "tokens", "layout", "SIMD", "GB/s", "x memcpy (same point)",
                     "x in-place stream (same point)", "x copy bandwidth (ceiling)"], rows)


def bias_section(res):
    rows = []
    for r in res.select(group="bias_tile"):
        b = next(x for x in res.gb["bench_bias"] if x["name"].removesuffix("/real_time") == r["name"])
        rows.append((r["encoder"], r["n_q"], r["variant"], fmt(b.get("elements", 0) / 1e9) if b.get("elements") else "",
                     fmt(r.get("gb_per_s")), ratio_cell(r, "ratio_cache_copy")))
    return md_table(["bias", "tile side", "positions", "G elements/s", "GB/s (tile read + written)",
                     "x cache copy bandwidth"], rows)


def memory_section(res):
    probes = res.select(group="memory_probe")
    if not probes:
        return "_No memory probes in this run._"
    forward = [r for r in probes if r["path"] != "backward"]
    backward = [r for r in probes if r["path"] == "backward"]
    text = memory_table(res, forward) if forward else ""
    if backward:
        text += ("\n\n**Backward** (posenc::attention_backward after a forward that is not measured): the same "
                 "shape, each cell the peak resident set minus the resident set at start, so it includes q, k, v, "
                 "out, dout, dq, dk, dv (8 · n · d · 4 bytes) and the log-sum-exp. O(n) memory shows as a slope "
                 "of at most 1.05 (the goal; no n × n buffer).\n\n" + memory_table(res, backward, goal=1.05))
    return text


def memory_table(res, probes, goal=None):
    ns = sorted({r["n_kv"] for r in probes})
    cols = []
    for r in probes:
        key = (r["path"], r["encoder"])
        if key not in cols:
            cols.append(key)
    table = []
    for n in ns:
        cells = [fmt_n(n)]
        for path, enc in cols:
            hit = [r for r in probes if r["n_kv"] == n and r["path"] == path and r["encoder"] == enc]
            if not hit:
                cells.append("")
            elif hit[0]["status"] != "ok":
                cells.append(hit[0]["status"])
            else:
                cells.append(fmt_bytes(hit[0]["rss_growth_bytes"]))
        table.append(cells)
    slopes = ["slope (last 4 points)"]
    for path, enc in cols:
        pts = sorted((r["n_kv"], r["rss_growth_bytes"]) for r in probes
                     if r["path"] == path and r["encoder"] == enc and r["status"] == "ok")
        s = slope(pts[-4:])
        cell = "" if s is None else f"**{s:.2f}**"
        if goal is not None and s is not None:
            cell += f" (≤ {goal}: {goal_cell(s, goal, False, '')})"
        slopes.append(cell)
    table.append(slopes)
    shape = res.meta.get("probe_shape", {})
    text = "" if goal is not None else (f"One process per point: {shape.get('heads', 1)} head, d = {shape.get('d', 128)}, causal prefill, "
            "no workspace passed (the call allocates its own). Each cell is the peak resident set of the process "
            "(VmHWM of /proc/self/status) minus its resident set at start, so the inputs q, k, v and out "
            f"(4 · n · d · 4 bytes) are included. Naive points whose memory would pass the limit "
            f"({res.meta.get('mem_limit_gib', 8)} GiB) are not run.\n\n")
    text += md_table(["n"] + [f"{p}, {e}" for p, e in cols], table)
    heap = []
    for path in ("blockwise", "naive", "backward"):
        pts = sorted((r["n_kv"], r["kernel_peak_bytes"]) for r in probes
                     if r["path"] == path and r["encoder"] == "none" and r["status"] == "ok")
        if pts:
            heap.append(f"{path}: " + ", ".join(f"{fmt_n(n)} → {fmt_bytes(b)}" for n, b in pts))
    if heap:
        text += ("\n\nThe call's own heap allocations in the same processes (encoder none): " + "; ".join(heap) + ".")
    return text


def span(values, form=lambda v: f"{v:.2f}"):
    """'0.80-0.86' (one value when both ends read the same), empty without values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    lo, hi = form(min(vals)), form(max(vals))
    return lo if lo == hi else f"{lo} to {hi}" if lo.startswith(("+", "-")) else f"{lo}-{hi}"


def percent(v):
    """'+4%', '-1%'; a change that rounds to zero is '+0%'."""
    text = f"{100 * v:+.0f}%"
    return "+0%" if text == "-0%" else text


FP32_DECODE_GOAL = 0.8  # of the read bandwidth


def goals_section(res):
    """The speed goals of the kernels, each against the ceiling of the instruction set in use (the
    FMA peak and read bandwidth of this run): met, or missed by how much, or why there is no figure."""
    rows = []

    def add(goal, figure, values, target, at_least, missing, form=lambda v: f"{v:.2f}", caveat=None, note=None):
        """`values`: (value, where) pairs; the goal holds when every value does. `caveat`: a note for
        the measured figures and what a met goal says instead of "met" (the figures are not evidence).
        `note`: `where` of the worst value -> a remark on it for the measured cell, or None."""
        vals = [(v, w) for v, w in values if v is not None]
        if not vals:
            rows.append((goal, figure, "not in this run", missing))
            return
        worst = min(vals) if at_least else max(vals)
        cell = goal_cell(worst[0], target, at_least, "")
        if form is percent and cell.startswith("missed"):
            pts = 100 * abs(worst[0] - target)
            pts_off = round(pts)
            cell = (f"missed by {pts_off} point{'' if pts_off == 1 else 's'}" if pts_off >= 1
                    else f"missed by {pts:.1f} point")
        measured = span((v for v, _ in vals), form) + f" (worst: {worst[1]})"
        if caveat:
            measured += "; " + caveat[0]
            cell = caveat[1] if cell == "met" else cell
        remark = note(worst[1]) if note else None
        if remark:
            measured += "; " + remark
        rows.append((goal, figure, measured, cell))

    for d, target in ((128, 0.8), (64, 0.75)):
        pts = [(r["ratio_fma"], f"{r['mask']} {fmt_n(r['n_kv'])}") for r in res.select(group="prefill", path="blockwise",
                                                                                    status="ok")
               if r["d"] == d and 4096 <= (r["n_kv"] or 0) <= 16384]
        add(f"prefill, full and causal, 8 heads, d = {d}, n = 4k-16k: ≥ {target} of the {res.fma_name}",
            "GFLOP/s over the peak", pts, target, True, "no blockwise prefill points of 4k-16k")
    full = {(r["d"], r["n_kv"]): r for r in res.select(group="prefill", path="blockwise", mask="full", status="ok")}
    pts = [(r["time_s"] / full[(r["d"], r["n_kv"])]["time_s"], f"d = {r['d']}, {fmt_n(r['n_kv'])}")
           for r in res.select(group="prefill", path="blockwise", mask="causal", status="ok")
           if (r["d"], r["n_kv"]) in full and (r["n_kv"] or 0) >= 4096]
    add("causal prefill time ≤ 0.53 of full (n ≥ 4k)", "causal time / full time", pts, 0.53, False,
        "no pair of full and causal points from 4k")
    enc = res.select(group="encoder", path="blockwise", status="ok")
    n_enc = 8192 if any(r["n_kv"] == 8192 for r in enc) else max((r["n_kv"] for r in enc), default=None)
    at = {r["encoder"]: r for r in enc if r["n_kv"] == n_enc}
    for names, target in ((("rope", "rope_llama3"), 0.03), (("alibi", "t5"), 0.05), (("shaw",), 0.10)):
        pts = [(at[e]["time_s"] / at["none"]["time_s"] - 1, e) for e in names if e in at and "none" in at]
        add(f"{' and '.join(names)} inside causal prefill at n = {fmt_n(n_enc) if n_enc else '8k'}: "
            f"≤ +{100 * target:.0f}% over none", "time over none's", pts, target, False,
            "no encoder points with none beside them", percent)
    pts = [(r["speedup_vs_fp32"], f"{r['storage']} {fmt_n(r['n_kv'])}") for r in res.select(group="storage",
                                                                                          path="blockwise",
                                                                                          status="ok")
           if r["storage"] in ("bf16", "fp16") and r.get("speedup_vs_fp32")]
    add("half-precision K/V prefill ≥ 0.95 of the fp32 speed", "fp32 time / half-precision time", pts, 0.95,
        True, "no bf16 / fp16 storage points beside fp32")
    gains = bf16_qk_gains(res)
    rows.append(("bf16 Q K^T products (`bf16_qk`) on a bf16 cache, causal GQA prefill: the gain over float "
                 "products (reported; vdpbf16ps where the CPU has AVX512_BF16)", "bf16 time / bf16_qk time",
                 (span(g[0] for g in gains) + " (" + ", ".join(sorted({g[2] for g in gains})) + ")") if gains
                 else "not in this run", "no goal set" if gains else "no bf16_qk points beside bf16"))
    dec = [r for r in res.select(group="decode", path="blockwise", status="ok") if r["n_q"] == 1]
    n_dec = max((r["n_kv"] for r in dec), default=None)
    pts = [(r["speedup_vs_fp32"], f"{r['storage']} {fmt_n(r['n_kv'])}") for r in dec
           if r["storage"] != "fp32" and r["n_kv"] == n_dec and r.get("speedup_vs_fp32")]
    # fp32 decode is bound by the read bandwidth and half-precision decode, at twice the tokens per
    # byte, much less so: when a neighbour takes bandwidth, the fp32 point slows more and the speed-up
    # grows. Against an fp32 point under its own bandwidth goal the speed-up is not evidence.
    ref = [r for r in dec if r["storage"] == "fp32" and r["n_kv"] == n_dec and r.get("ratio_read") is not None]
    slow = ref and ref[0]["ratio_read"] < FP32_DECODE_GOAL
    fp32_dec = next((r for r in dec if r["storage"] == "fp32" and r["n_kv"] == n_dec and r.get("time_s")), None)
    half_dec = {f"{r['storage']} {fmt_n(r['n_kv'])}": r for r in dec if r["storage"] != "fp32" and r["n_kv"] == n_dec}

    def roofline_note(where):
        """How far the roofline lets the worst point go against the same fp32 point: where the
        half-precision call is bound by the multiply-adds as much as by its bytes, 1.8x needs it
        near its roofline."""
        r = half_dec.get(where)
        if not r or not fp32_dec or r.get("roofline_s") is None or not r.get("ratio_roofline"):
            return None
        other = (f"its multiply-adds at the peak take {r['roofline_fma_s'] / r['roofline_s']:.2f} of that time"
                 if r["roofline_bound"] == "read" else
                 f"its bytes at the read bandwidth take {r['roofline_read_s'] / r['roofline_s']:.2f} of that time")
        return (f"its roofline here allows {fp32_dec['time_s'] / r['roofline_s']:.2f} ({r['roofline_bound']}-bound; "
                f"{other}), reached {r['ratio_roofline']:.2f} of it")

    add(f"half-precision decode (1 query, GQA 8/2, d = 128, {fmt_n(n_dec) if n_dec else 'longest'} cached): ≥ 1.8x "
        "the fp32 tokens/s", "per-token speed-up over fp32", pts, 1.8, True, "no bf16 / fp16 decode points",
        caveat=(f"fp32 there at {ref[0]['ratio_read']:.2f} of the read bandwidth, under its {FP32_DECODE_GOAL} "
                "goal, so the speed-up is overstated", "met only against a slowed fp32 point") if slow else None,
        note=roofline_note)
    pts = [(r["ratio_read"], fmt_n(r["n_kv"])) for r in dec
           if r["storage"] == "fp32" and 32768 <= r["n_kv"] <= 131072 and r.get("ratio_read") is not None]
    add(f"fp32 decode (1 query, GQA 8/2, d = 128, 32k-128k cached): ≥ {FP32_DECODE_GOAL} of the read bandwidth",
        "K/V GB/s over the read bandwidth", pts, FP32_DECODE_GOAL, True,
        "no fp32 decode points of 32k-128k, or no read ceiling")
    return (f"Each goal against this run's ceilings of the instruction set in use ({res.fma_name}); "
            "`scripts/bench --simd-cap avx2` measures the AVX2 kernels on an AVX-512 machine."
            f"{best_of_goals_text(res.meta)}\n\n" +
            md_table(["goal", "figure", "measured", "met?"], rows))


BACKWARD_GOAL = 0.5  # of the FMA peak, counting 2.5x the forward's FLOP


def backward_section(res):
    rows = res.select(group="backward")
    if not rows and not res.select(group="backward_encoder"):
        return "_No backward points in this run (bench_backward was not built or was filtered out)._"
    fwd = {(r["mask"], r["n_kv"], r["d"]): r for r in rows if r["path"] == "forward"}
    table = []
    for r in sorted((r for r in rows if r["path"] == "backward"), key=lambda r: (r["mask"] or "", r["n_kv"] or 0)):
        f = fwd.get((r["mask"], r["n_kv"], r["d"]))
        over = (r["time_s"] / f["time_s"] if f and f.get("time_s") and r.get("time_s") else None)
        table.append((r["mask"], r["d"], fmt_n(r["n_kv"]), fmt_time(r.get("time_s")),
                      fmt_time(f.get("time_s")) if f else "not run", fmt_ratio(over) if over else "",
                      fmt(r.get("gflops")), ratio_cell(r, "ratio_fma"),
                      goal_cell(r.get("ratio_fma"), BACKWARD_GOAL, True, ratio_cell(r, "ratio_fma")),
                      fmt_bytes(r.get("workspace_bytes")), status_cell(r)))
    text = ("posenc::attention_backward (dq, dk, dv from q, k, v, out, the log-sum-exp and dout; 8 heads) beside the "
            "forward of the same shape. GFLOP/s count 2.5x the forward's FLOP (FlashAttention's convention: five "
            "tile products against the forward's two), whatever the kernel recomputes; the goal is "
            f"≥ {BACKWARD_GOAL} of the {res.fma_name}.\n\n")
    text += md_table(["mask", "d", "n", "backward", "forward", "backward / forward", "GFLOP/s",
                      f"x {res.fma_name}", f"goal ≥ {BACKWARD_GOAL}", "workspace", "status"], table)
    enc = res.select(group="backward_encoder")
    if enc:
        none = {r["n_kv"]: r for r in rows if r["path"] == "backward" and r["mask"] == "causal" and r["d"] == 128
                and r.get("time_s")}
        ns = sorted({r["n_kv"] for r in enc})
        names = []
        for r in enc:
            if r["encoder"] not in names:
                names.append(r["encoder"])
        cells = []
        for e in names:
            line = [e]
            for n in ns:
                hit = [r for r in enc if r["encoder"] == e and r["n_kv"] == n]
                if not hit:
                    line.append("not run")
                elif hit[0]["status"] != "ok":
                    line.append(hit[0]["status"])
                else:
                    r = hit[0]
                    cost = (f", {100 * (r['time_s'] / none[n]['time_s'] - 1):+.0f}% time" if n in none else "")
                    line.append(f"{fmt(r['gflops'])} ({ratio_cell(r, 'ratio_fma')}{cost})")
            cells.append(line)
        text += ("\n\n**Encoders in the causal backward** (d = 128): GFLOP/s (ratio to the "
                 f"{res.fma_name}, time against the backward without an encoder at the same n). The gradients of "
                 "learned parameters (T5's table, Shaw's aK and aV) are not asked for here.\n\n")
        text += md_table(["encoder"] + [f"n = {fmt_n(n)}" for n in ns], cells)
    return text


def backward_headline(res):
    lines = []
    for mask in ("causal", "full"):
        rows = [r for r in res.select(group="backward", path="backward", mask=mask, status="ok")
                if r.get("gflops") is not None]
        if not rows:
            continue
        r = max(rows, key=lambda r: r["n_kv"] or 0)
        f = [x for x in res.select(group="backward", path="forward", mask=mask, status="ok")
             if x["n_kv"] == r["n_kv"] and x["d"] == r["d"] and x.get("time_s")]
        over = f"; {fmt_ratio(r['time_s'] / f[0]['time_s'])}x the forward's time" if f else ""
        lines.append(f"Backward, {mask}, n = {fmt_n(r['n_kv'])} (8 heads, d = {r['d']}): {fmt(r['gflops'])} GFLOP/s "
                     f"(2.5x the forward's FLOP) {res.of_peak(r)}{over}")
    return lines


def ring_section(res):
    note = res.meta.get("ring", "not run")
    if not res.ring:
        return f"_Ring attention: {note}._"

    def cell(k, v):
        if isinstance(v, list):
            return ", ".join(cell(k, x) for x in v[:8]) + (", ..." if len(v) > 8 else "")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and re.search(r"bytes|rss", k, re.I):
            return fmt_bytes(v)
        return fmt(v) if isinstance(v, float) else str(v)

    parts = [f"{note}.", "The records of bench/mpi/ring_bench.cpp (its header says what each measures), one "
             "table per kind; per-rank figures are the largest (`_max`) and smallest (`_min`) rank."]
    names = []
    for r in res.ring:
        if r.get("name") not in names:
            names.append(r.get("name"))
    for name in names:
        recs = sorted((r for r in res.ring if r.get("name") == name), key=lambda r: r["_P"])
        keys = []
        for r in recs:
            for k in r:
                if not k.startswith("_") and k not in keys and k not in ("name", "heads", "kv_heads", "head_dim"):
                    keys.append(k)
        shape = recs[0]
        parts.append(f"**{name or 'records'}** (heads {shape.get('heads', '?')}/{shape.get('kv_heads', '?')}, "
                     f"d = {shape.get('head_dim', '?')}):\n\n" +
                     md_table(keys, [[cell(k, r.get(k, "")) for k in keys] for r in recs]))
    if res.ring_memory():
        parts.append("![ring](ring.png)")
    return "\n\n".join(parts)


def failures_section(res):
    bad = [s for s in res.steps if s.get("rc") not in (0, None)]
    if not bad:
        return ""
    return "## Failed steps\n\n" + md_table(["step", "exit", "command"], [
        (f"{s['exe']} {s['name']}", s["rc"], "`" + " ".join(s["argv"][-6:]) + "`") for s in bad]) + "\n"


def write_csv(res, folder):
    with open(os.path.join(folder, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in res.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench/report.py RESULTS_FOLDER")
    folder = sys.argv[1]
    res = Results(folder)
    write_csv(res, folder)
    try:
        pngs = plots(res, folder)
    except ImportError as e:
        print(f"bench/report.py: no plots ({e}); install python3-matplotlib", file=sys.stderr)
        pngs = []
    head = headline(res)
    m = res.meta
    parts = [
        f"# posenc benchmark report: {m.get('date', '?')}, {m.get('host', '?')}, mode {m.get('mode', '?')}",
        f"Commit `{m.get('commit', '?')}`. Every point and its ratios are in [results.csv](results.csv); the raw "
        "Google Benchmark JSON of each executable is beside it. How to read this report, the ceilings and the "
        "formulas: [docs/benchmarks.md](../../../docs/benchmarks.md).",
        "## Headline\n\n" + ("\n".join(f"- {h}" for h in head) if head else "_Nothing measured._"),
        "## Plots\n\n" + "\n\n".join(f"![{p}]({p})" for p in pngs if p != "ring.png"),
        "## Machine\n\n" + machine_section(res),
        "## Ceilings, measured in this run\n\n" + ceilings_section(res),
        "## How the figures are computed\n\n"
        f"- GFLOP/s: {FLOP_FORMULA}\n"
        "- tokens/s: query tokens per second (n_q / time).\n"
        "- Decode GB/s: the K and V bytes the call must read, 2 · n_kv · kv_heads · d · (4 for fp32, 2 for bf16 and "
        "fp16), per second, divided by the DRAM read bandwidth (a vectorised sum on all threads, bytes read only). "
        "Encoders on their own: the matrix read and written once, 2 · rows · cols · 4 bytes, divided by the DRAM "
        "copy bandwidth; in-place kernels can pass it, because memcpy also reads every destination line before "
        "writing it.\n"
        "- Kernel heap peak: Google Benchmark's MemoryManager runs each point once more and reports the highest "
        "heap use above what was held once the inputs were set up, so it counts the kernel's own "
        "allocations: the blockwise workspace, the naive scores and copies, Eigen's buffers. Points run with "
        "repetitions report the same figure from the benchmark's own heap counter (the MemoryManager of Google "
        "Benchmark 1.7 is unsafe with repetitions).\n"
        "- Peak RSS: a fresh process per size (bench/probe_memory.cpp), see the memory section.\n"
        "- Serving: GB/s counts the cached K and V of every sequence of the call, 2 · keys · kv_heads · d · "
        "(4 or 2), over the read bandwidth; the multi-token roofline is max(K/V bytes / read bandwidth, FLOP / "
        "multiply-add peak); paged and mixed points are also compared with points of the same run (time over "
        "the contiguous call; the step over its prefill and decode parts run alone).\n"
        "- Time is wall time per call (Google Benchmark real time), with all cores (a posenc::thread_pool) unless "
        "stated. The output is written before timing and each blockwise point makes one untimed call first, so "
        "first-touch page faults of buffers an engine reuses are not timed.",
        "## Speed goals of the kernels\n\n" + goals_section(res),
        "## Attention prefill: full, causal, sliding window, GQA (8 heads)\n\n" + prefill_section(res),
        "## Encoders inside causal prefill (8 heads, d = 128)\n\n" + encoder_section(res),
        "## Decode against a KV cache (GQA 8/2, d = 128; K and V in fp32, bf16, fp16)\n\n" + decode_section(res),
        "## Serving: the engine step (paged_attention, GQA 32/8, d = 128)\n\n" + serving_section(res),
        "## Workspace reused or allocated per call (causal prefill, 8 heads, d = 128)\n\n" + workspace_section(res),
        "## Encoders on their own (bandwidth bound)\n\n" + apply_section(res),
        "## RoPE kernels by layout and SIMD level (bench_rope)\n\n" + rope_section(res),
        "## Bias tiles (bench_bias)\n\n" + bias_section(res),
        "## Attention backward (training; 8 heads, d = 128)\n\n" + backward_section(res),
        "## Peak memory against sequence length\n\n" + memory_section(res),
        "## Ring attention (P = 1, 2, 4)\n\n" + ring_section(res),
        failures_section(res),
    ]
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n\n".join(p for p in parts if p).rstrip() + "\n")
    print("Headline:")
    for h in head:
        print(f"- {h}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
