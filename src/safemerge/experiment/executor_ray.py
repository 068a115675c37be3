"""`safemerge experiment --executor ray`: the stages of `runner.execute` as a Ray graph (docs/distributed.md).

The same cells, keys, stamps and files as the local run, spread over a Ray cluster:

- training the setup's adapters (task, safety) and SafeInstr cells that train: Ray tasks (`train`
  resources); a cell that reads a trained adapter is submitted once that training finished (its key
  depends on the adapter's content);
- defence cells: Ray tasks (`defend` resources), each writing its variant and stamp (`runner.run_cell`);
- evaluation: long-lived actors (`evaluate` resources), each loading the aligned model once and
  evaluating the adapter variants as they arrive (the aligned row on the same model); a full model
  (RESTA, the unaligned model) is evaluated in a task of its own. With the vLLM backend (adapters are
  fixed when an engine starts) or the Llama Guard judge, each phase's rows are split among the actors
  once they all exist and evaluated as groups (`grouped_evaluation`).

Order: validation evaluations, then each `choose` on the driver (its derived controls computed as
tasks), then the test evaluations; without a `choose`, test evaluations follow each variant at once.
The driver places work itself so that idle actors never starve a queued task of resources (compute
first, one slot kept for an actor while evaluations wait). A task whose worker process dies is retried
(`execution.max_retries`); an exception is not retried: the cell is reported in `result.failed` and in
the results, and every other cell still completes. OUT must be on a filesystem every worker sees.

Test-only hooks (read on the driver, acted on in the worker; never set them in real runs):
`SAFEMERGE_TEST_KILL_CELL=TAG` kills the worker process on the first attempt of TAG, and
`SAFEMERGE_TEST_FAIL_CELL=TAG` raises in every attempt; TAG is a cell label (its computation),
`evaluate:LABEL` (its evaluation) or `train:task` / `train:safety`, several separated by `;`.
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from safemerge.common.errors import InputError
from safemerge.evaluate.api import make_backend, score
from safemerge.evaluate.backends import Backend, TransformersBackend
from safemerge.evaluate.benchmarks import Benchmark
from safemerge.evaluate.judge_plugins import choose_judges
from safemerge.evaluate.runner import Responses, Variant, generate_all
from safemerge.experiment.cells import (
    Cell,
    EvalPlan,
    ExperimentResult,
    assign_keys,
    eval_done,
    variant_dir,
    variant_done,
)
from safemerge.experiment.config import ExecutionSpec, ExperimentConfig, Stage
from safemerge.experiment.evaluation import (
    Planned,
    _eval_config,
    _write_row,
    budget_groups,
    cache_dir,
    evaluate_cells,
    is_full_model,
    load_planned,
)
from safemerge.experiment.runner import choose, needs_training, run_cell, train_input

console = Console(stderr=True)
RAY_MISSING = "--executor ray needs Ray: pip install 'safemerge[ray]'"
KILL_HOOK = "SAFEMERGE_TEST_KILL_CELL"  # test only (module docstring)
FAIL_HOOK = "SAFEMERGE_TEST_FAIL_CELL"  # test only
EPS = 1e-9  # fractional GPUs add up with rounding


def import_ray() -> Any:
    """The `ray` module, or an InputError saying how to install it."""
    try:
        import ray  # lazy: Ray is the optional extra safemerge[ray]
    except ImportError:
        raise InputError(RAY_MISSING) from None
    return ray


def where() -> str:
    """The worker this runs in, for progress lines: host and process id."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def report(start: float, **extra: Any) -> dict[str, Any]:
    """What a worker returns about a finished job: where it ran, how long, its peak memory so far."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    info = {"where": where(), "seconds": time.perf_counter() - start, "pid": os.getpid(), "rss_mb": rss_mb}
    return info | extra


def set_threads(cpus: float) -> None:
    """Torch threads = the CPUs the task holds (at least 1), so packed tasks do not oversubscribe."""
    torch.set_num_threads(max(1, int(cpus)))


@dataclass(frozen=True)
class Hooks:
    """The test-only fault hooks (module docstring), carried to the workers inside each task."""

    kill: frozenset[str] = frozenset()
    fail: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls) -> Hooks:
        """The hooks' tags (several separated by `;`) from the driver's environment."""

        def tags(name: str) -> frozenset[str]:
            return frozenset(t for t in os.environ.get(name, "").split(";") if t)

        return cls(tags(KILL_HOOK), tags(FAIL_HOOK))

    def apply(self, tag: str, out: Path) -> None:
        """Raise when `tag` is the failing one; end this process on the first attempt of the killed one
        (a marker file under OUT/.test-hooks says the first attempt happened)."""
        if tag in self.fail:
            raise RuntimeError(f"test hook {FAIL_HOOK}: {tag} fails")
        if tag in self.kill:
            marker = out / ".test-hooks" / hashlib.sha256(tag.encode()).hexdigest()[:16]
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(tag + "\n", encoding="utf-8")
                os._exit(1)  # a worker that dies mid-cell, as an out-of-memory kill would


# --- what runs in the workers ------------------------------------------------------------------------
def train_task(cfg: ExperimentConfig, out: Path, role: str, cpus: float, hooks: Hooks) -> dict[str, Any]:
    """Train the setup's `role` adapter (a Ray task)."""
    hooks.apply(f"train:{role}", out)
    set_threads(cpus)
    start = time.perf_counter()
    train_input(cfg, out, role)
    return report(start)


def cell_task(cell: Cell, out: Path, cpus: float, hooks: Hooks) -> dict[str, Any]:
    """Compute one cell's variant and stamp it (a Ray task)."""
    hooks.apply(cell.label, out)
    set_threads(cpus)
    start = time.perf_counter()
    run_cell(cell, out, progress=False)
    return report(start)


def full_model_task(
    cfg: ExperimentConfig, out: Path, cell: Cell, plan: EvalPlan, planned: Planned, cpus: float, hooks: Hooks
) -> dict[str, Any]:
    """Evaluate one full model (RESTA's output, the unaligned model) on its own (a Ray task)."""
    hooks.apply(f"evaluate:{cell.label}", out)
    set_threads(cpus)
    start = time.perf_counter()
    evaluate_cells(cfg, out, [cell], plan, planned)
    return report(start, loads=1)


class EvalWorker:
    """A long-lived evaluator (a Ray actor): loads the aligned model on first use and keeps it, adding
    each adapter variant to it as it arrives (transformers), or evaluates a group at once (vLLM)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        out: Path,
        plans: dict[str, tuple[EvalPlan, Planned]],
        cpus: float,
        hooks: Hooks,
    ) -> None:
        set_threads(cpus)
        self.cfg, self.out, self.plans, self.hooks, self.cpus = cfg, out, plans, hooks, cpus
        self.backend: Backend | None = None
        self.loads = 0

    def _backend(self, planned: Planned) -> Backend:
        """The aligned model, loaded once per worker process."""
        if self.backend is None:
            ecfg = _eval_config(self.cfg, self.out, self.cfg.setup.aligned, [], planned[0][1])
            self.backend = make_backend(ecfg)
            self.loads += 1
        return self.backend

    def evaluate(self, cell: Cell, phase: str) -> dict[str, Any]:
        """One row on the phase's benchmarks, exactly as `evaluation._evaluate_models` does it for a row:
        one prompt stream per token budget, scored and written to the row's evaluation directory."""
        self.hooks.apply(f"evaluate:{cell.label}", self.out)
        start = time.perf_counter()
        cfg, out = self.cfg, self.out
        plan, planned = self.plans[phase]
        model = cfg.setup.aligned
        backend = self._backend(planned)
        adapter = None if cell.method == "aligned" else str(variant_dir(out, cell))
        if adapter is not None:
            assert isinstance(backend, TransformersBackend)
            backend.add_adapter(adapter)
        variant = Variant(model, None) if adapter is None else Variant(adapter, adapter)
        responses: Responses = {}
        for tokens, benches in budget_groups(planned):
            assert isinstance(backend, TransformersBackend)
            backend.max_new_tokens = tokens
            responses.update(
                generate_all(
                    backend, model, [variant], benches, cache_dir(cfg, out), cfg.evaluation.batch_size, tokens
                )
            )
        ecfg = _eval_config(cfg, out, model, [] if adapter is None else [adapter], planned[0][1])
        records, metrics = score(ecfg, [variant], [b for b, _ in planned], responses, cache_dir(cfg, out))
        _write_row(out, cell, plan, records, metrics[variant.key]["benchmarks"])
        return report(start, loads=self.loads)

    def compute(self, job: Job) -> dict[str, Any]:
        """A training or a cell, when every slot of the cluster is held by evaluation actors (the
        driver's fallback: the same work as `train_task` / `cell_task`, on this actor's resources)."""
        if job.kind == "train":
            assert job.role is not None
            info = train_task(self.cfg, self.out, job.role, job.res["cpus"], self.hooks)
        else:
            assert job.cell is not None
            info = cell_task(job.cell, self.out, job.res["cpus"], self.hooks)
        set_threads(self.cpus)
        return info

    def evaluate_group(self, cells: list[Cell], phase: str) -> dict[str, Any]:
        """Several rows at once on engines started for them (vLLM fixes its adapters at start-up)."""
        for c in cells:
            self.hooks.apply(f"evaluate:{c.label}", self.out)
        start = time.perf_counter()
        plan, planned = self.plans[phase]
        evaluate_cells(self.cfg, self.out, cells, plan, planned)
        self.loads += len(budget_groups(planned))  # one engine per token budget
        return report(start, loads=self.loads)


# --- the driver --------------------------------------------------------------------------------------
def grouped_evaluation(cfg: ExperimentConfig) -> bool:
    """Whether the actors evaluate each phase's rows in groups (`evaluation.evaluate_cells` on a share
    of them) rather than one row at a time as they arrive: with vLLM (an engine's adapters are fixed at
    start-up) and with a model judge such as Llama Guard (loaded once per group, as in the local run,
    instead of once per row)."""
    ev = cfg.evaluation
    return ev.backend == "vllm" or any(c.model for c in choose_judges(ev.judge, ev.judge_model))


@dataclass
class Job:
    """One unit of work: train an input, compute a cell, or evaluate rows in a phase."""

    kind: str  # "train" | "cell" | "eval" (on an actor) | "full" (full-model evaluation task)
    label: str
    res: dict[str, float]
    cell: Cell | None = None
    role: str | None = None
    phase: str | None = None
    group: list[Cell] = field(default_factory=list)  # grouped evaluation: the rows of one actor call


@dataclass
class Actor:
    """An evaluation actor, its resources, and whether it is busy."""

    handle: Any
    name: str
    busy: bool = False


def error_text(exc: BaseException) -> str:
    """A failed task's error in one line: the original exception's type and message where Ray has it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"


class RayExecutor:
    """The `runner.Executor` that runs on Ray; `stats` holds what the last run did (model loads, workers)."""

    def __init__(self, spec: ExecutionSpec) -> None:
        import_ray()  # a missing Ray fails before any work
        self.spec = spec
        self.stats: dict[str, Any] = {}

    def run(
        self,
        cfg: ExperimentConfig,
        result: ExperimentResult,
        provided: Mapping[str, Benchmark],
        progress: bool,
    ) -> None:
        ray = import_ray()
        started = False
        if not ray.is_initialized():
            ray.init(
                address=self.spec.ray_address,
                include_dashboard=False,
                logging_level="warning",
                log_to_driver=progress,  # the workers' own progress bars and tables
            )
            started = True
        try:
            run = RayRun(ray, self.spec, cfg, result, provided)
            run.run()
            self.stats = run.stats
        finally:
            if started:
                ray.shutdown()


class RayRun:
    """One experiment on Ray: queues of work, the driver's own accounting of the cluster's resources,
    and the loop that submits what fits and handles what finished."""

    def __init__(
        self,
        ray: Any,
        spec: ExecutionSpec,
        cfg: ExperimentConfig,
        result: ExperimentResult,
        provided: Mapping[str, Benchmark],
    ) -> None:
        self.ray, self.spec, self.cfg, self.result = ray, spec, cfg, result
        self.out = result.out
        self.hooks = Hooks.from_env()
        self.res: dict[Stage, dict[str, float]] = {
            s: spec.resources(s) for s in ("train", "defend", "evaluate")
        }
        self.plans = {p: (plan, load_planned(plan, provided)) for p, plan in result.plans.items()}
        self.grouped = grouped_evaluation(cfg)
        self.test_open = not any(d.choose for d in cfg.defenses)  # test evaluations wait for the choices
        self.compute_q: deque[Job] = deque()
        self.eval_q: deque[Job] = deque()
        self.full_q: deque[Job] = deque()
        self.running: dict[Any, tuple[Job, Actor | None]] = {}
        self.actors: list[Actor] = []
        self.started = 0  # actors started so far (names them)
        self.in_use = {"cpus": 0.0, "gpus": 0.0}
        self.queued: set[tuple[str, str]] = set()  # (label, phase) evaluations queued or done
        self.train_failed: dict[str, str] = {}
        self.loads: dict[str, int] = {}  # worker (pid) → models it loaded
        self.where: dict[str, str] = {}
        self.stats: dict[str, Any] = {}
        self.rss: dict[str, float] = {}  # worker → its peak RSS in MB, as last reported
        self.finished = 0
        self.start = time.perf_counter()
        self.tasks = {  # the remote functions and the actor class, made once
            "train": ray.remote(train_task),
            "cell": ray.remote(cell_task),
            "full": ray.remote(full_model_task),
            "actor": ray.remote(EvalWorker),
        }

    # --- resources ---------------------------------------------------------------------------------
    def capacity(self) -> dict[str, float]:
        total = self.ray.cluster_resources()
        return {"cpus": float(total.get("CPU", 0.0)), "gpus": float(total.get("GPU", 0.0))}

    def fits(self, res: dict[str, float], extra: dict[str, float] | None = None) -> bool:
        cap = self.capacity()
        return all(
            self.in_use[k] + res[k] + (extra or {}).get(k, 0.0) <= cap[k] + EPS for k in ("cpus", "gpus")
        )

    def hold(self, res: dict[str, float], sign: float = 1.0) -> None:
        for k in ("cpus", "gpus"):
            self.in_use[k] += sign * res[k]

    def options(self, res: dict[str, float]) -> dict[str, Any]:
        return {"num_cpus": res["cpus"], "num_gpus": res["gpus"]}

    # --- queueing ----------------------------------------------------------------------------------
    def queue_cell(self, cell: Cell) -> None:
        """Compute `cell` unless its variant is done; then queue the evaluations it is due."""
        if variant_done(self.out, cell):
            self.after_variant(cell)
            return
        stage: Stage = "train" if cell.train is not None else "defend"
        self.compute_q.append(Job("cell", cell.label, self.res[stage], cell=cell))

    def after_variant(self, cell: Cell) -> None:
        """Queue the evaluations a computed (or cached) variant is due in the open phases."""
        plans = self.result.plans
        if "validation" in plans and cell.validates:
            self.queue_eval(cell, "validation")
        if self.test_open and cell.tabulated:
            self.queue_eval(cell, "test")

    def queue_eval(self, cell: Cell, phase: str) -> None:
        if (cell.label, phase) in self.queued or cell.label in self.result.failed:
            return
        self.queued.add((cell.label, phase))
        if eval_done(self.out, cell, self.result.plans[phase]):
            return
        full = is_full_model(self.out, cell)
        (self.full_q if full else self.eval_q).append(
            Job("full" if full else "eval", cell.label, self.res["evaluate"], cell=cell, phase=phase)
        )

    def queue_derived(self, cells: list[Cell], out: Path, progress: bool, result: ExperimentResult) -> None:
        """`runner.choose`'s compute step: the derived controls become tasks like every other cell."""
        for c in cells:
            self.queue_cell(c)

    # --- submitting --------------------------------------------------------------------------------
    def submit_compute(self, job: Job) -> None:
        opts = self.options(job.res) | {"max_retries": self.spec.max_retries}
        if job.kind == "train":
            assert job.role is not None
            ref = (
                self.tasks["train"]
                .options(**opts)
                .remote(self.cfg, self.out, job.role, job.res["cpus"], self.hooks)
            )
        else:
            ref = self.tasks["cell"].options(**opts).remote(job.cell, self.out, job.res["cpus"], self.hooks)
        self.running[ref] = (job, None)
        self.hold(job.res)

    def submit_full(self, job: Job) -> None:
        assert job.cell is not None and job.phase is not None
        plan, planned = self.plans[job.phase]
        opts = self.options(job.res) | {"max_retries": self.spec.max_retries}
        ref = (
            self.tasks["full"]
            .options(**opts)
            .remote(self.cfg, self.out, job.cell, plan, planned, job.res["cpus"], self.hooks)
        )
        self.running[ref] = (job, None)
        self.hold(job.res)

    def new_actor(self) -> Actor:
        """Start an evaluation actor (it loads its model on its first row); its resources are held."""
        res = self.res["evaluate"]
        cls = self.tasks["actor"].options(
            **self.options(res), max_restarts=self.spec.max_retries, max_task_retries=self.spec.max_retries
        )
        actor = Actor(
            cls.remote(self.cfg, self.out, self.plans, res["cpus"], self.hooks),
            f"eval worker {self.started + 1}",
        )
        self.started += 1
        self.actors.append(actor)
        self.hold(res)
        return actor

    def give(self, actor: Actor, job: Job) -> None:
        """Hand `job` to an idle actor: a row, a group of rows, or a computation that found no slot."""
        actor.busy = True
        if job.kind in ("train", "cell"):
            ref = actor.handle.compute.remote(job)
        elif job.group:
            ref = actor.handle.evaluate_group.remote(job.group, job.phase)
        else:
            ref = actor.handle.evaluate.remote(job.cell, job.phase)
        self.running[ref] = (job, actor)

    def drop_actor(self, actor: Actor) -> None:
        self.ray.kill(actor.handle)
        self.actors.remove(actor)
        self.hold(self.res["evaluate"], -1.0)

    def covers(self, job: Job) -> bool:
        """Whether an evaluation actor holds at least the resources `job` asks for."""
        return all(self.res["evaluate"][k] + EPS >= job.res[k] for k in ("cpus", "gpus"))

    def max_actors(self) -> int:
        if self.spec.eval_workers is not None:
            return self.spec.eval_workers
        cap, res = self.capacity(), self.res["evaluate"]
        fit = [cap[k] / res[k] for k in ("cpus", "gpus") if res[k] > 0]
        return max(1, int(min(fit) + EPS)) if fit else 1

    def compute_busy(self) -> bool:
        return bool(self.compute_q) or any(j.kind in ("train", "cell") for j, _ in self.running.values())

    def group_evals(self) -> None:
        """Grouped evaluation: once no computation is pending, split each phase's queued rows among the
        actors that may run (one group each)."""
        if not self.grouped or self.compute_busy() or not self.eval_q or any(j.group for j in self.eval_q):
            return
        jobs = list(self.eval_q)
        self.eval_q.clear()
        n = max(1, min(self.max_actors(), len(jobs)))
        for phase in dict.fromkeys(j.phase for j in jobs):
            mine = [j.cell for j in jobs if j.phase == phase and j.cell is not None]
            for k in range(min(n, len(mine))):
                part = mine[k::n]
                self.eval_q.append(
                    Job(
                        "eval",
                        ", ".join(c.label for c in part),
                        self.res["evaluate"],
                        phase=phase,
                        group=part,
                    )
                )

    def dispatch(self) -> None:
        """Submit what fits: computations first (they feed the rest, but leave one actor's room while
        evaluations wait and no actor exists), then full-model evaluations, then actor work."""
        evaluating = bool(self.eval_q) and not self.actors and not self.grouped
        while self.compute_q and (
            self.fits(self.compute_q[0].res, self.res["evaluate"] if evaluating else None)
            or (not self.running and self.fits(self.compute_q[0].res))
        ):
            self.submit_compute(self.compute_q.popleft())
        while self.compute_q and not self.fits(self.compute_q[0].res):  # every slot held by actors
            idle = next((a for a in self.actors if not a.busy and self.covers(self.compute_q[0])), None)
            if idle is None:
                break
            self.give(idle, self.compute_q.popleft())
        compute_room = self.compute_q[0].res if self.compute_q else None
        while self.full_q and (
            self.fits(self.full_q[0].res, compute_room)
            or (not self.running and self.fits(self.full_q[0].res))
        ):
            self.submit_full(self.full_q.popleft())
        self.group_evals()
        if self.grouped and self.compute_busy():
            return
        while self.eval_q:
            idle = next((a for a in self.actors if not a.busy), None)
            if idle is None:
                can = len(self.actors) < self.max_actors() and (
                    self.fits(self.res["evaluate"], compute_room)
                    or (not self.actors and self.fits(self.res["evaluate"]))
                )
                if not can:
                    break
                idle = self.new_actor()
            self.give(idle, self.eval_q.popleft())

    def unstick(self) -> bool:
        """Nothing runs but work waits: free an idle actor's resources, or fail what can never fit."""
        idle = next((a for a in reversed(self.actors) if not a.busy), None)
        if idle is not None and (self.compute_q or self.full_q):
            self.drop_actor(idle)
            return True
        cap = self.capacity()
        queues = (self.compute_q, self.full_q, self.eval_q)
        never = [(q, j) for q in queues for j in q if not self.fits(j.res)]  # not even on an idle cluster
        for queue, job in never or [(q, j) for q in queues for j in q]:
            queue.remove(job)
            res = f"{job.res['cpus']:g} CPU(s) and {job.res['gpus']:g} GPU(s)"
            self.fail(job, f"needs {res}; the cluster has {cap['cpus']:g} CPU(s), {cap['gpus']:g} GPU(s)")
        return False

    # --- finishing ---------------------------------------------------------------------------------
    def fail(self, job: Job, error: str) -> None:
        if job.kind == "train":
            assert job.role is not None
            self.train_failed[job.role] = error
        for c in job.group or ([job.cell] if job.cell is not None else []):
            if c is not None:
                self.result.failed.setdefault(c.label, error)
        console.print(f"FAILED {job.label}: {error}", highlight=False, markup=False, soft_wrap=True)

    def finish(self, ref: Any) -> None:
        job, actor = self.running.pop(ref)
        if actor is not None:
            actor.busy = False
        else:
            self.hold(job.res, -1.0)
        try:
            info = self.ray.get(ref)
        except Exception as exc:  # a task that raised, or whose worker kept dying: reported, not fatal
            if actor is not None and isinstance(exc, self.ray.exceptions.RayActorError):
                self.actors.remove(actor)  # it died for good: its resources are free again
                self.hold(self.res["evaluate"], -1.0)
            self.fail(job, error_text(exc))
            return
        self.finished += 1
        self.rss[info["where"]] = max(self.rss.get(info["where"], 0.0), info["rss_mb"])
        place = f"{actor.name}, {info['where']}" if actor is not None else info["where"]
        if actor is not None and "loads" in info:  # the actor process's count so far
            key = f"{actor.name} pid {info['pid']}"
            self.loads[key] = max(self.loads.get(key, 0), info["loads"])
        elif "loads" in info:
            self.loads[f"{job.label} ({job.phase}) pid {info['pid']}"] = info["loads"]
        verb = {"train": "trained", "cell": "computed"}.get(job.kind)
        verb = verb or ("validated" if job.phase == "validation" else "evaluated")
        console.print(
            f"[{self.finished}] {verb} {job.label} on {place} ({info['seconds']:.1f} s)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        self.done(job, place)

    def done(self, job: Job, place: str) -> None:
        if job.kind == "train":
            assert job.role is not None
            self.result.trained.append(job.role)
            return
        for c in job.group or ([job.cell] if job.cell is not None else []):
            self.where[f"{job.kind}:{job.phase or ''}:{c.label}"] = place
            if job.kind == "cell":
                self.result.computed.append(c.label)
                self.after_variant(c)
            elif job.phase == "validation":
                self.result.validated.append(c.label)
            else:
                self.result.evaluated.append(c.label)

    def drain(self, until: Callable[[], bool] | None = None) -> None:
        """Submit and collect until `until()` holds, or (None) every queue is empty and nothing runs."""
        while not (until is not None and until()):
            self.dispatch()
            if not self.running:
                if not (self.compute_q or self.full_q or self.eval_q):
                    return
                self.unstick()
                continue
            ready, _ = self.ray.wait(list(self.running), num_returns=1)
            for ref in ready:
                self.finish(ref)

    # --- the stages --------------------------------------------------------------------------------
    def run(self) -> None:
        """The stages in the local run's order; the actors are released however it ends."""
        try:
            self.stages()
        finally:
            for a in list(self.actors):
                self.drop_actor(a)
        self.close()

    def stages(self) -> None:
        """Train the inputs (cells that read no trained adapter start meanwhile), compute the cells and
        validate them as they appear, choose, then evaluate the table on test."""
        cfg, result, out = self.cfg, self.result, self.out
        roles = [r for r in ("task", "safety") if needs_training(cfg, out, r)]
        for role in roles:
            self.compute_q.append(Job("train", f"the {role} adapter", self.res["train"], role=role))
        waiting = [c for c in result.cells if set(c.inputs) & set(roles)]
        for c in result.cells:  # cells that read no adapter being trained start now
            if not set(c.inputs) & set(roles):
                self.queue_cell(c)
        if roles:
            self.drain(lambda: all(r in result.trained or r in self.train_failed for r in roles))
            if result.trained:  # the adapters' content changed: the keys that depend on it
                assign_keys(cfg, out, result.cells, allow_download=True)
        for c in waiting:
            bad = [r for r in self.train_failed if r in c.inputs]
            if bad:
                result.failed[c.label] = f"needs the {bad[0]} adapter, whose training failed"
            else:
                self.queue_cell(c)
        self.drain()
        result.timings["variants_s"] = time.perf_counter() - self.start
        if "validation" in result.plans:
            self.choose_all()
        result.timings["validation_s"] = time.perf_counter() - self.start - result.timings["variants_s"]
        self.test_open = True
        for c in result.table:
            if c.label not in result.failed and variant_done(out, c):
                self.queue_eval(c, "test")
        self.drain()
        result.timings["test_eval_s"] = time.perf_counter() - self.start - sum(result.timings.values())

    def choose_all(self) -> None:
        """Every `choose`, in config order, on the validation results (runner.choose); derived controls
        are queued as tasks. A choice whose reference or every candidate failed is reported, not made."""
        result = self.result
        for i, spec in enumerate(self.cfg.defenses):
            if spec.choose is None:
                continue
            cands = [c for c in result.cells if c.spec == i and c.role == "candidate"]
            lost = [spec.choose.reference] if spec.choose.reference in result.failed else []
            if lost or all(c.label in result.failed for c in cands):
                what = f"reference {lost[0]!r}" if lost else "every candidate"
                result.failed[f"{spec.name or spec.method} (choice)"] = f"not made: {what} failed"
                continue
            choose(self.cfg, result, i, progress=False, compute=self.queue_derived)

    def close(self) -> None:
        """Order the result's lists as the cells are, keep the stats, print the summary."""
        order = {c.label: k for k, c in enumerate(self.result.cells)}
        for labels in (self.result.computed, self.result.validated, self.result.evaluated):
            labels.sort(key=lambda label: order.get(label, len(order)))
        self.result.trained.sort(key=("task", "safety").index)
        loads = sum(self.loads.values())
        self.stats = {
            "model_loads": loads,
            "loads_by_worker": dict(self.loads),
            "where": dict(self.where),
            "peak_rss_mb": dict(self.rss),
        }
        r = self.result
        console.print(
            f"ray: computed {len(r.computed)}, validated {len(r.validated)}, evaluated {len(r.evaluated)}, "
            f"failed {len(r.failed)}; {loads} model load(s) on {len(self.loads)} worker(s); "
            f"{time.perf_counter() - self.start:.1f} s",
            highlight=False,
            soft_wrap=True,
        )
