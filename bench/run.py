#!/usr/bin/env python3
"""Runs posenc's benchmark suite one point at a time and writes the raw results.

scripts/bench builds the executables and calls this, then bench/report.py. Every Google Benchmark
point runs in its own process (so a progress line can name it before it starts, and one crash
costs one point), then the points of each executable are merged into one Google Benchmark JSON
file. The ceilings (FMA peak, copy and read bandwidth, Eigen SGEMM) run first, and the FMA peak and
the bandwidths again at the end, so the report can show how much the machine drifted during the run.
--simd-cap (or POSENC_SIMD_CAP in the environment) caps the instruction set of the kernels and of
the FMA peak: avx512, avx2 or portable.

Writes into --out:
  meta.json                  machine, compiler, Eigen, environment, commit, mode, timings, and the
                             instruction set the kernels ran with ("simd")
  <executable>.json / .txt   Google Benchmark JSON of every point, and the console log
  ceilings_end.json          the FMA peak, copy and read bandwidth measured again at the end
  probe_memory.jsonl         one fresh process per (path, encoder, n): peak RSS and heap; paths naive,
                             blockwise (the forward) and backward (attention_backward)
  ring_P<P>.json             the MPI ring benchmark's records, P = 1, 2, 4 (when it is built)
  steps.json                 every step: its command, status and wall time
"""

import argparse
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

MODES = ("quick", "default", "full")

# POSENC_SIMD_CAP values (bench/run_settings.hpp), highest first.
SIMD_CAPS = ("avx512", "avx2", "portable")

# Google Benchmark --benchmark_min_time per mode: each point repeats until it has run this long
# (one call is enough for the long ones).
MIN_TIME = {"quick": 0.01, "default": 0.25, "full": 0.5}

# The points a speed goal compares closely (prefill at d = 64 and 128 against the FMA peak and
# causal against full; each encoder inside causal prefill against none, at 8k; decode from fp32,
# bf16 and fp16 caches of 32k-128k tokens against each other) run as one process per group,
# BEST_OF repetitions in a random interleaving (Google Benchmark's
# --benchmark_enable_random_interleaving), and each keeps its fastest repetition: a single run of
# an 8k point is one or two calls, and on a shared machine one of them can be slowed by a few
# percent, as large as the goals' margins; the DRAM bandwidth decode sees moves by more. Five by
# default: with three, the RoPE variants that do the same kernel work (plain, linear, NTK) still
# spread over 4% at 8k in one AVX2 run on the 2-core VM (2026-12-02); five adds about 3 minutes.
BEST_OF = {"quick": 1, "default": 5, "full": 7}
BEST_OF_GROUPS = (re.compile(r"^attention/blockwise/(4096|8192|16384)/(64|128)/[01]/"),
                  re.compile(r"^attention/encoder/[a-z0-9_]+/blockwise/8192/"),
                  re.compile(r"^attention/decode(_bf16|_fp16)?/n_kv:(32768|65536|131072)/n_q:1/"))
BEST_OF_TEXT = ("prefill at d = 64 and 128, n = 4k-16k", "the encoders inside causal prefill at 8k",
                "decode of 32k-128k tokens")

# Fresh-process memory probes: one head of d = 128, causal prefill, for these encoders, at
# n = 1024 .. PROBE_MAX_N (powers of two). A naive point past the memory limit is not run: the
# probe prints "skipped: would need X GiB" at once.
PROBE_ENCODERS = ("none", "rope_llama3", "alibi", "t5", "shaw")
PROBE_PATHS = ("blockwise", "naive", "backward")
PROBE_MAX_N = {"quick": 4096, "default": 65536, "full": 262144}
PROBE_SHAPE = {"heads": 1, "d": 128, "causal": 1}

# Open MPI on this kind of machine (2 cores, root, no network but loopback), from the project's
# notes on running MPI here: oversubscribe 4 ranks on 2 cores, shared memory only, no binding,
# waiting ranks yield the CPU.
MPIRUN_FLAGS = ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                "--mca", "plm", "isolated", "--mca", "pml", "ob1", "--mca", "btl", "self,vader",
                "--mca", "btl_vader_single_copy_mechanism", "none", "--mca", "oob_tcp_if_include", "lo",
                "--mca", "mpi_yield_when_idle", "1"]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PMIX_MCA_gds": "hash"}
RING_RANKS = (1, 2, 4)

# Environment variables that change what the kernels do; the report lists them, set or not.
ENV_PATTERNS = re.compile(r"^(OMP_|GOMP_|KMP_|OPENBLAS_|MKL_|BLIS_|EIGEN_|POSENC_|OMPI_|MALLOC_|GLIBC_TUNABLES)")
ENV_ALWAYS = ("OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "OMP_DYNAMIC", "OPENBLAS_CORETYPE",
              "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "GLIBC_TUNABLES", "POSENC_SIMD_CAP")

GB_SPECIALS = set(".^$|()[]{}*+?\\")


def gb_anchor(name):
    """A --benchmark_filter regex matching exactly `name`."""
    return "^" + "".join("\\" + c if c in GB_SPECIALS else c for c in name) + "$"


def fmt_duration(s):
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.bin = os.path.join(args.build, "bench")
        self.start = time.time()
        self.steps = []  # (kind, exe, name, argv, output file or None)
        self.records = []
        self.env = dict(os.environ, POSENC_BENCH_MODE=args.mode, POSENC_BENCH_MEM_LIMIT_GIB=str(args.mem_limit))
        if args.simd_cap:
            self.env["POSENC_SIMD_CAP"] = args.simd_cap
        self.filter = re.compile(args.filter) if args.filter else None
        self.min_time = args.min_time if args.min_time is not None else MIN_TIME[args.mode]
        self.logs = {}

    # ---- planning ----

    def exe(self, name):
        return os.path.join(self.bin, name)

    def list_points(self, exe):
        r = subprocess.run([self.exe(exe), "--benchmark_list_tests=true"], env=self.env, capture_output=True,
                           text=True, check=True)
        return [line.strip() for line in r.stdout.splitlines() if line.strip()]

    def selected(self, label):
        return self.filter is None or self.filter.search(label) is not None

    def add_gb(self, kind, exe, name, json_name=None, names=None, best_of=1):
        """One process for the point `name`, or for the points `names` (shown as `name`) run
        `best_of` times each, interleaved."""
        tmp = os.path.join(self.out, "raw", exe, f"{len(self.steps):04d}.json")
        pattern = "|".join(gb_anchor(n) for n in (names or [name]))
        argv = [self.exe(exe), "--benchmark_filter=" + pattern, "--benchmark_out=" + tmp,
                "--benchmark_out_format=json", f"--benchmark_min_time={self.min_time}"]
        if best_of > 1:
            argv += [f"--benchmark_repetitions={best_of}", "--benchmark_enable_random_interleaving=true"]
        self.steps.append({"kind": kind, "exe": exe, "name": name, "argv": argv + self.args.bench_args, "raw": tmp,
                           "json": json_name or exe, "best_of": best_of})

    def plan(self):
        exes = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.bin, "bench_*"))
                      if os.access(p, os.X_OK) and not p.endswith(".json"))
        if "bench_attention" not in exes:
            sys.exit(f"bench/run.py: no {self.exe('bench_attention')}; build first")
        points = {exe: self.list_points(exe) for exe in exes}
        ceilings = [n for n in points["bench_attention"] if n.startswith("posenc_bench::")]
        # Ceilings first, always (every ratio needs them), the Eigen SGEMM of the attention shapes too.
        for n in ceilings:
            self.add_gb("ceiling", "bench_attention", n)
        for n in points.get("bench_eigen_ceiling", []):
            self.add_gb("ceiling", "bench_eigen_ceiling", n)
        best_of = BEST_OF[self.args.mode]
        order, groups = [], {}
        for exe in ["bench_attention"] + [e for e in exes if e not in ("bench_attention", "bench_eigen_ceiling")]:
            for n in points[exe]:
                if n in ceilings or not self.selected(n):
                    continue
                g = None
                if exe == "bench_attention" and best_of > 1:
                    g = next((g.pattern for g in BEST_OF_GROUPS if g.search(n)), None)
                if g is None:
                    order.append((exe, n, None))
                    continue
                if g not in groups:
                    groups[g] = []
                    order.append((exe, None, g))  # the group runs where its first point would
                groups[g].append(n)
        for exe, n, g in order:
            if g is None:
                self.add_gb("bench", exe, n)
            else:
                names = groups[g]
                self.add_gb("bench", exe, f"{len(names)} points, best of {best_of} interleaved: {names[0]} ...",
                            names=names, best_of=best_of)
        self.plan_probes()
        self.plan_ring()
        for n in ceilings:
            self.add_gb("ceiling_end", "bench_attention", n, json_name="ceilings_end")

    def plan_probes(self):
        probe = self.exe("probe_memory")
        if not os.access(probe, os.X_OK):
            print(f"bench/run.py: no {probe}, no fresh-process memory figures", file=sys.stderr)
            return
        n_max = PROBE_MAX_N[self.args.mode]
        for path in PROBE_PATHS:
            for enc in PROBE_ENCODERS:
                n = 1024
                while n <= n_max:
                    name = f"probe/{path}/{enc}/{n}"
                    if self.selected(name):
                        argv = [probe, "--path", path, "--encoder", enc, "--n", str(n),
                                "--heads", str(PROBE_SHAPE["heads"]), "--d", str(PROBE_SHAPE["d"]),
                                "--causal", str(PROBE_SHAPE["causal"]), "--mem-limit-gib", str(self.args.mem_limit)]
                        self.steps.append({"kind": "probe", "exe": "probe_memory", "name": name, "argv": argv,
                                           "path": path, "encoder": enc})
                    n *= 2

    def plan_ring(self):
        ring = os.path.join(self.bin, "mpi", "ring_bench")
        mpirun = shutil.which("mpirun")
        if not os.access(ring, os.X_OK):
            self.ring_note = ("not run: bench/mpi/ring_bench was not built (no bench/mpi in this tree, or MPI "
                              "not found by CMake)")
            return
        if mpirun is None:
            self.ring_note = "not run: no mpirun on PATH"
            return
        self.ring_note = "run: mpirun " + " ".join(MPIRUN_FLAGS) + " -np P ring_bench --out ring_P<P>.json"
        for p in RING_RANKS:
            name = f"ring/P{p}"
            if not self.selected(name):
                continue
            dest = os.path.join(self.out, f"ring_P{p}.json")
            argv = [mpirun] + MPIRUN_FLAGS + ["-np", str(p), ring, "--out", dest]
            if self.args.mode == "quick":
                argv.append("--quick")
            self.steps.append({"kind": "ring", "exe": "ring_bench", "name": name, "argv": argv, "ranks": p})

    # ---- running ----

    def log(self, exe):
        if exe not in self.logs:
            self.logs[exe] = open(os.path.join(self.out, exe + ".txt"), "a")
        return self.logs[exe]

    def run(self):
        total = len(self.steps)
        failures = 0
        probe_lines = []
        for i, step in enumerate(self.steps, 1):
            elapsed = fmt_duration(time.time() - self.start)
            shown = step["name"].removesuffix("/real_time")
            print(f"[{i}/{total} {elapsed}] {step['exe']} {shown}", file=sys.stderr, flush=True)
            env = step_env(self.env, step)
            if "raw" in step:
                os.makedirs(os.path.dirname(step["raw"]), exist_ok=True)
            t0 = time.time()
            r = subprocess.run(step["argv"], env=env, capture_output=True, text=True)
            step["seconds"] = round(time.time() - t0, 3)
            step["rc"] = r.returncode
            log = self.log(step["exe"] if step["kind"] != "ceiling_end" else "ceilings_end")
            log.write(f"$ {' '.join(step['argv'])}\n{r.stdout}{r.stderr}\n")
            log.flush()
            if r.returncode != 0:
                failures += 1
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                print(f"    FAILED (exit {r.returncode}): {' | '.join(tail)}", file=sys.stderr, flush=True)
                continue
            if step["kind"] == "probe":
                line = r.stdout.strip().splitlines()[-1]
                rec = json.loads(line)
                probe_lines.append(line)
                if rec.get("status", "ok") != "ok":
                    print(f"    {rec['status']}", file=sys.stderr, flush=True)
            elif "raw" in step:
                self.note_gb_errors(step)
        with open(os.path.join(self.out, "probe_memory.jsonl"), "w") as f:
            f.write("".join(line + "\n" for line in probe_lines))
        for f in self.logs.values():
            f.close()
        self.merge()
        return failures

    def note_gb_errors(self, step):
        try:
            with open(step["raw"]) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return
        for b in data.get("benchmarks", []):
            if b.get("error_occurred"):
                print(f"    {b.get('error_message', 'error')}", file=sys.stderr, flush=True)

    def merge(self):
        """One Google Benchmark JSON file per executable: the first point's context, every point."""
        merged = {}
        for step in self.steps:
            if "raw" not in step or step.get("rc") != 0 or not os.path.exists(step["raw"]):
                continue
            with open(step["raw"]) as f:
                data = json.load(f)
            m = merged.setdefault(step["json"], {"context": data.get("context", {}), "benchmarks": []})
            m["benchmarks"] += fastest_repetitions(data.get("benchmarks", []), step)
        for name, data in merged.items():
            with open(os.path.join(self.out, name + ".json"), "w") as f:
                json.dump(data, f, indent=1)
        shutil.rmtree(os.path.join(self.out, "raw"), ignore_errors=True)
        with open(os.path.join(self.out, "steps.json"), "w") as f:
            json.dump([{k: v for k, v in s.items() if k in ("kind", "exe", "name", "argv", "seconds", "rc")}
                       for s in self.steps if "rc" in s], f, indent=1)


# Google Benchmark's MemoryManager figures. With repetitions, Google Benchmark 1.7 reports them
# correctly for a point's last repetition only (the earlier ones point into a vector that has
# grown since, and read garbage; it can crash), so repeated steps run without the MemoryManager
# and report the benchmark's own heap counters with every repetition. Should the figures be there
# anyway (a run by hand), a point's fastest repetition takes them from its last.
MEMORY_FIELDS = ("max_bytes_used", "total_allocated_bytes", "net_heap_growth", "allocs_per_iter")


def step_env(base, step):
    """The environment of a step: MPI's settings for the ring; for repeated points, no Google
    Benchmark MemoryManager (unsafe with repetitions in 1.7, see bench/memory_manager.hpp: these
    points report their heap figures as counters)."""
    env = dict(base, **MPI_ENV) if step["kind"] == "ring" else dict(base)
    if step.get("best_of", 1) > 1:
        env["POSENC_BENCH_MEMORY_MANAGER"] = "0"
    return env


def fastest_repetitions(benchmarks, step):
    """The step's points, one entry per name: of repetitions, the fastest (the aggregates dropped),
    with how many there were and the memory figures of the last repetition."""
    best, last = {}, {}
    for b in benchmarks:
        if b.get("run_type", "iteration") != "iteration":
            continue
        b["wall_seconds"] = step["seconds"]
        if step.get("best_of", 1) > 1:
            b["best_of"] = step["best_of"]
        name = b["name"]
        if name not in last or b.get("repetition_index", 0) >= last[name].get("repetition_index", 0):
            last[name] = b
        if name not in best or (not b.get("error_occurred") and b.get("real_time", 0) < best[name].get("real_time", 0)):
            best[name] = b
    out = []
    for name, b in best.items():
        b = dict(b)
        for f in MEMORY_FIELDS:
            b.pop(f, None)
            if f in last[name]:
                b[f] = last[name][f]
        out.append(b)
    return out


# ---- machine description ----

def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def command_output(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def cmake_cache(build):
    cache = {}
    for line in read(os.path.join(build, "CMakeCache.txt")).splitlines():
        m = re.match(r"^([A-Za-z0-9_]+):[A-Z]+=(.*)$", line)
        if m:
            cache[m.group(1)] = m.group(2)
    return cache


def eigen_version(cache):
    for d in filter(None, [cache.get("Eigen3_DIR"), "/usr/share/eigen3/cmake", "/usr/lib/cmake/eigen3"]):
        m = re.search(r'PACKAGE_VERSION "([^"]+)"', read(os.path.join(d, "Eigen3ConfigVersion.cmake")))
        if m:
            return m.group(1)
    macros = read("/usr/include/eigen3/Eigen/src/Core/util/Macros.h")
    parts = [re.search(rf"#define EIGEN_{k}_VERSION (\d+)", macros) for k in ("WORLD", "MAJOR", "MINOR")]
    return ".".join(p.group(1) for p in parts) if all(parts) else "unknown"


def machine(args, cache):
    cpuinfo = read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    flags = flags.group(1).split() if flags else []
    wanted = [f for f in flags if re.match(r"^(sse4_2|avx|avx2|fma|f16c|avx512\w*|amx\w*|avx_vnni|bmi2)$", f)]
    mem = re.search(r"^MemTotal:\s*(\d+) kB", read("/proc/meminfo"), re.M)
    cxx = cache.get("CMAKE_CXX_COMPILER", "c++")
    build_type = cache.get("CMAKE_BUILD_TYPE", "")
    flags_cfg = (cache.get("CMAKE_CXX_FLAGS", "") + " " + cache.get("CMAKE_CXX_FLAGS_" + build_type.upper(), "")).strip()
    commit = command_output(["git", "rev-parse", "HEAD"]) or "unknown"
    dirty = command_output(["git", "status", "--porcelain", "--untracked-files=no"])
    env = {k: v for k, v in sorted(os.environ.items()) if ENV_PATTERNS.match(k)}
    for k in ENV_ALWAYS:
        env.setdefault(k, None)
    lscpu = command_output(["lscpu"])
    lscpu_fields = {}
    for line in lscpu.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            lscpu_fields[k.strip()] = v.strip()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "mode": args.mode,
        "mem_limit_gib": args.mem_limit,
        "min_time_s": args.min_time if args.min_time is not None else MIN_TIME[args.mode],
        "best_of": BEST_OF[args.mode],
        "best_of_points": list(BEST_OF_TEXT) if BEST_OF[args.mode] > 1 else [],
        "filter": args.filter,
        "bench_args": args.bench_args,
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "cpu_model": model.group(1) if model else platform.processor(),
        "cpus": os.cpu_count(),
        "threads_per_core": lscpu_fields.get("Thread(s) per core"),
        "cpu_mhz": lscpu_fields.get("CPU max MHz") or lscpu_fields.get("CPU MHz"),
        "caches": {k: v for k, v in lscpu_fields.items() if k.endswith("cache")},
        "hypervisor": lscpu_fields.get("Hypervisor vendor"),
        "cpu_flags": wanted,
        "memory_gib": round(int(mem.group(1)) / 1048576, 1) if mem else None,
        "kernel": platform.release(),
        "governor": read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").strip() or None,
        "compiler": cxx + " (" + (command_output([cxx, "--version"]).splitlines() or ["?"])[0] + ")",
        "build_type": build_type,
        "compile_flags": flags_cfg + " (no -march: the portable build a header-only library gets; "
                         "bench_eigen_ceiling alone is built with -march=native)",
        "threads": f"a posenc::thread_pool of {os.cpu_count()} workers (one per hardware thread)",
        "eigen": eigen_version(cache),
        "google_benchmark": command_output(["dpkg-query", "-W", "-f=${Version}", "libbenchmark-dev"]) or "unknown",
        "python": platform.python_version(),
        "env": env,
        "probe_shape": dict(PROBE_SHAPE, encoders=list(PROBE_ENCODERS), max_n=PROBE_MAX_N[args.mode]),
        "load_average_start": read("/proc/loadavg").split()[:3],
    }


def simd_in_use(out, cap):
    """The instruction set the kernels ran with, as posenc_bench::fma_peak measured it (its label:
    isa, detected, cap, lanes, op, threads), with the cap asked for."""
    simd = {"cap": cap}
    data = load_gb(os.path.join(out, "bench_attention.json"))
    for b in data.get("benchmarks", []):
        if b["name"].startswith("posenc_bench::fma_peak") and not b.get("error_occurred"):
            lab = {k: int(v) if v.isdigit() else v
                   for k, v in (tok.split("=", 1) for tok in (b.get("label") or "").split() if "=" in tok)}
            simd.update(in_use=lab.get("isa"), detected=lab.get("detected"), lanes=lab.get("lanes"),
                        op=lab.get("op"), threads=lab.get("threads"))
            return simd
    simd.update(in_use=None, why="posenc_bench::fma_peak did not run or failed (see steps.json)")
    return simd


def load_gb(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", required=True, help="the CMake build directory (its bench/ holds the executables)")
    ap.add_argument("--out", required=True, help="the results folder to write")
    ap.add_argument("--mode", choices=MODES, default="default")
    ap.add_argument("--filter", help="only points whose name matches this regex (ceilings always run)")
    ap.add_argument("--mem-limit", type=float, default=8.0, help="GiB a naive point may need (default 8)")
    ap.add_argument("--min-time", type=float, help="Google Benchmark min time per point, seconds")
    ap.add_argument("--simd-cap", choices=SIMD_CAPS,
                    help="highest instruction set the kernels and the FMA peak may use (sets POSENC_SIMD_CAP); "
                         "default: the best the CPU has")
    ap.add_argument("bench_args", nargs="*", help="passed to every Google Benchmark executable")
    args = ap.parse_args()
    cap = args.simd_cap or os.environ.get("POSENC_SIMD_CAP") or None
    if cap not in (None,) + SIMD_CAPS:
        ap.error(f"POSENC_SIMD_CAP={cap}: expected one of {', '.join(SIMD_CAPS)}")

    os.makedirs(args.out, exist_ok=True)
    cache = cmake_cache(args.build)
    meta = machine(args, cache)
    if args.simd_cap:
        meta["env"]["POSENC_SIMD_CAP"] = args.simd_cap
    runner = Runner(args)
    runner.plan()
    meta["ring"] = runner.ring_note
    failures = runner.run()
    meta["run_seconds"] = round(time.time() - runner.start, 1)
    meta["load_average_end"] = read("/proc/loadavg").split()[:3]
    meta["failed_steps"] = failures
    meta["simd"] = simd_in_use(args.out, cap)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"bench/run.py: {len(runner.steps)} steps in {fmt_duration(meta['run_seconds'])}, {failures} failed",
          file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
