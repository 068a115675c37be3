"""Executor benchmark: the organism's demo experiment with the local executor vs on Ray, side by side.

Both runs compute every cell and evaluate every row from scratch (a fresh OUT and generation cache
each, the same path in turn), on the organism already built in `$SAFEMERGE_CACHE` (the build is not
timed; the script refuses to start when it is missing rather than build it):

- local: `runner.execute` in one process with 2 torch threads;
- ray: a local Ray instance with 2 CPUs, every task and evaluation worker on 1 CPU (1 torch thread).

Each run is a subprocess of its own (peak RSS per run). Printed: wall time of each run and their ratio,
Ray's start-up, model loads (the local run counts `make_backend` calls; the Ray run counts the loads
its workers report), peak RSS of the driver and of the largest Ray worker, and whether results.csv,
results.md and results.json are byte-identical between the two.

Usage: SAFEMERGE_CACHE=/path python benchmarks/bench_executor.py [--full-demo] [--harm 60 --benign 60
--task 40 --val 60 --val-task 30]. Default: the demo's grid with fewer prompts (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = ("results.csv", "results.md", "results.json")


def settings(args: argparse.Namespace, out: Path) -> Any:
    from safemerge.organism.demo import DemoSettings

    if args.full_demo:
        return DemoSettings(out=out, progress=False)
    return DemoSettings(
        out=out,
        harm_limit=args.harm,
        benign_limit=args.benign,
        task_limit=args.task,
        val_limit=args.val,
        val_task=args.val_task,
        progress=False,
    )


def built_organism() -> Any:
    """The organism of the default recipe, only if every stage is already in the cache."""
    from safemerge.common.packaged import cache_root
    from safemerge.organism.build import build_organism, organism_root, resolve_recipe, set_threads
    from safemerge.organism.recipe import OrganismRecipe

    set_threads()
    recipe, _ = resolve_recipe(OrganismRecipe())  # the precision this machine builds the organism in
    root = organism_root(None)
    ku = recipe.stage_key("unaligned")
    ka = recipe.stage_key("aligned", ku)
    stages = [f"unaligned-{ku}", f"aligned-{ka}"]
    stages += [f"{s}-{recipe.stage_key(s, ka)}" for s in ("task", "safety", "safeinstr")]
    missing = [s for s in stages if not (root / s).is_dir()]
    if missing:
        sys.exit(
            f"the organism is not built in {cache_root()} (missing {missing}): run `safemerge organism build`"
        )
    return build_organism(recipe, None, progress=False)


def one_run(executor: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process: the demo's experiment config, a fresh generation cache under OUT."""
    import torch

    from safemerge.experiment import evaluation
    from safemerge.experiment.results import write_results
    from safemerge.experiment.runner import execute
    from safemerge.organism.demo import demo_config, place_inputs, prepare_out, validation_benchmarks

    torch.set_num_threads(2)
    org = built_organism()
    s = settings(args, out)
    prepare_out(s)
    place_inputs(s, org)
    cfg = demo_config(s, org)
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"cache_dir": None})})
    loads = {"n": 0}
    make = evaluation.make_backend

    def counted(*a: Any, **k: Any) -> Any:
        loads["n"] += 1
        return make(*a, **k)

    evaluation.make_backend = counted  # type: ignore[assignment]  # the local run's model loads
    info: dict[str, Any] = {"executor": executor}
    runner = None
    if executor == "ray":
        import ray

        from safemerge.experiment.config import ExecutionSpec
        from safemerge.experiment.executor_ray import RayExecutor

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
        info["ray_start_s"] = time.perf_counter() - t0
        runner = RayExecutor(ExecutionSpec(executor="ray", cpus_per_cell=1))
    t0 = time.perf_counter()
    result = execute(cfg, out, progress=False, benchmarks=validation_benchmarks(s, org), executor=runner)
    write_results(cfg, out, result, result.plans["test"], result.plans.get("validation"))
    info["wall_s"] = time.perf_counter() - t0
    info["failed"] = result.failed
    info["cells"] = len(result.cells)
    info["evaluated"] = len(result.evaluated)
    info["validated"] = len(result.validated)
    if runner is not None:
        info["model_loads"] = runner.stats["model_loads"]
        info["loads_by_worker"] = runner.stats["loads_by_worker"]
        info["worker_peak_rss_mb"] = runner.stats.get("peak_rss_mb", {})
        import ray

        ray.shutdown()
    else:
        info["model_loads"] = loads["n"]
    info["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full-demo", action="store_true", help="the demo's own prompt counts (long)")
    p.add_argument("--harm", type=int, default=60, help="HarmBench test prompts")
    p.add_argument("--benign", type=int, default=60, help="benign (over-refusal) test prompts")
    p.add_argument("--task", type=int, default=40, help="arithmetic test prompts")
    p.add_argument("--val", type=int, default=60, help="validation harmful and benign prompts each")
    p.add_argument("--val-task", type=int, default=30, help="validation arithmetic prompts")
    p.add_argument("--run", choices=["local", "ray"], help=argparse.SUPPRESS)  # one run (a subprocess)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        print("RESULT " + json.dumps(one_run(args.run, args.out, args)), flush=True)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-executor-"))
    out = root / "out"
    infos = {}
    for executor in ("local", "ray"):
        cmd = [sys.executable, __file__, "--run", executor, "--out", str(out), *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{executor} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        infos[executor] = json.loads(line[len("RESULT ") :])
        out.rename(root / executor)
    same = {f: (root / "local" / f).read_bytes() == (root / "ray" / f).read_bytes() for f in RESULTS}
    local, ray_run = infos["local"], infos["ray"]
    print(json.dumps(infos, indent=1))
    print(f"cells {local['cells']}; validated {local['validated']}, evaluated {local['evaluated']} rows")
    print(f"local (2 torch threads): {local['wall_s']:.1f} s, {local['model_loads']} model loads, "
          f"peak RSS {local['driver_peak_rss_mb']:.0f} MB")  # fmt: skip
    worker_rss = max(ray_run["worker_peak_rss_mb"].values(), default=0.0)
    start = ray_run["ray_start_s"]
    print(f"ray (2 workers x 1 thread): {ray_run['wall_s']:.1f} s (+ {start:.1f} s Ray start), "
          f"{ray_run['model_loads']} model loads {ray_run['loads_by_worker']}, driver peak RSS "
          f"{ray_run['driver_peak_rss_mb']:.0f} MB, largest worker {worker_rss:.0f} MB")  # fmt: skip
    print(f"wall ratio ray/local: {ray_run['wall_s'] / local['wall_s']:.2f} "
          f"(with Ray's start: {(ray_run['wall_s'] + start) / local['wall_s']:.2f})")  # fmt: skip
    print(f"byte-identical: {same}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
