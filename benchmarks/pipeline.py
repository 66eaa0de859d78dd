"""The tiny pipeline from a fresh clone: cold, then fully cached (issue 11's goals: <= 10 min cold, <= 15 s cached).

    python -m benchmarks.pipeline [--jobs auto|N] [--no-step-server] [--json out.json]

Clones this repository's HEAD into a temporary folder, runs ``python -m entrypoints.pipeline`` there (what
``mlflow run .`` runs; the set-up, this interpreter's environment, is not counted) with the clone's own tracking
store and caches, then runs it again. Prints the wall times and where the cold run's time went, per step and per
evaluation suite, read from the clone's tracking store. Uncommitted changes are not in the clone: commit first.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_json  # noqa: E402


def timed_pipeline(clone: Path, experiment: str, jobs: int, env: dict, log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "entrypoints.pipeline", "--experiment", experiment, "--jobs", str(jobs)],
            cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"the pipeline failed (exit {done.returncode}); its output: {log}")
    return seconds


def where_the_time_went(clone: Path, env: dict) -> dict:
    """Seconds per step (summed over its runs) and per evaluation suite, from the clone's tracking store."""
    script = (
        "import json, mlflow\n"
        "c = mlflow.MlflowClient()\n"
        "runs = c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=5000)\n"
        "print(json.dumps([[r.data.tags.get('saecomp.step'), r.info.start_time, r.info.end_time, r.data.tags.get('saecomp.process'),\n"
        "  r.data.tags.get('saecomp.torch_threads'),\n"
        "  {k: v for k, v in r.data.metrics.items() if k.endswith('.seconds')}] for r in runs]))\n"
    )
    import json

    rows = json.loads(subprocess.run([sys.executable, "-c", script], cwd=clone, env=env, capture_output=True, text=True, check=True).stdout)
    steps: dict[str, float] = collections.defaultdict(float)
    runs: dict[str, int] = collections.Counter()
    forked = 0
    suites: dict[str, float] = collections.defaultdict(float)
    threads: dict[str, set] = collections.defaultdict(set)
    for step, start, end, process, torch_threads, seconds in rows:
        if not step or step == "pipeline" or not end:
            continue
        steps[step] += (end - start) / 1000
        runs[step] += 1
        forked += bool(process and process.startswith("forked"))
        threads[step].add(torch_threads or "?")
        for name, value in seconds.items():
            if step == "evaluate" and name.count(".") == 1:  # "<suite>.seconds"
                suites[name.removesuffix(".seconds")] += value
    return {
        "step_seconds": dict(steps),
        "step_runs": dict(runs),
        "step_torch_threads": {step: sorted(counts) for step, counts in threads.items()},
        "forked_steps": forked,
        "suite_seconds": dict(suites),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/tiny.yaml")
    parser.add_argument("--jobs", default="auto", help="the pipeline's --jobs (default auto, as `mlflow run .`)")
    parser.add_argument("--no-step-server", action="store_true", help="every step imports the libraries itself")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its store and logs) for a look")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout
    if dirty.strip():
        print("note: uncommitted changes are not measured (the clone is of HEAD)", file=sys.stderr)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    folder = Path(tempfile.mkdtemp(prefix="saecomp-pipeline-bench-"))
    clone = folder / "saecomp"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SAECOMP_"))}  # the clone's own store
    if args.no_step_server:
        env["SAECOMP_STEP_SERVER"] = "0"
    try:
        print(f"cold run of {args.experiment} in a clone of {head} ({clone}) ...", flush=True)
        cold = timed_pipeline(clone, args.experiment, args.jobs, env, folder / "cold.log")
        print(f"cold: {cold / 60:.1f} min; cached run ...", flush=True)
        cached = timed_pipeline(clone, args.experiment, args.jobs, env, folder / "cached.log")
        spent = where_the_time_went(clone, env)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    record = {
        "machine": machine(),
        "commit": head,
        "experiment": args.experiment,
        "jobs": args.jobs,
        "step_server": not args.no_step_server,
        "cold_seconds": cold,
        "cached_seconds": cached,
        **spent,
    }
    print("\n| run | wall | goal | met |\n|---|---|---|---|")
    print(f"| cold | {cold / 60:.2f} min | <= 10 min | {'yes' if cold <= 600 else '**no**'} |")
    print(f"| cached | {cached:.1f} s | <= 15 s | {'yes' if cached <= 15 else '**no**'} |")
    print("\n| step | runs | seconds (sum over its runs) | torch threads |\n|---|---|---|---|")
    for step, seconds in sorted(spent["step_seconds"].items(), key=lambda kv: -kv[1]):
        print(f"| {step} | {spent['step_runs'][step]} | {seconds:.0f} | {', '.join(spent['step_torch_threads'][step])} |")
    print("\n| evaluate suite | seconds (sum over SAEs) |\n|---|---|")
    for suite, seconds in sorted(spent["suite_seconds"].items(), key=lambda kv: -kv[1]):
        print(f"| {suite} | {seconds:.0f} |")
    print(f"\n{spent['forked_steps']} step runs forked by the step server")
    write_json(args.json, record)


if __name__ == "__main__":
    main()
