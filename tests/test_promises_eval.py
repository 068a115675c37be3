"""Promises around training data, evaluation and the demo's targets that no other test checked.

Bugs these tests catch (each was planted by hand in src/ and seen to fail, docs/testing.md):

- the HarmBench guard without its normalisation (case, punctuation, whitespace edits hide a prompt), with
  the substring rule off by one around MIN_SUBSTRING, or inspecting only the first user turn of a
  multi-turn `messages` example (`test_guard_*`);
- `safemerge experiment --dry-run` loading a model or a backend (`test_experiment_dry_run_loads_no_model`);
- a rerun of `safemerge eval` that generates again instead of reading the generation cache, or whose
  metrics differ from the first run's (`test_eval_rerun_generates_nothing_and_gives_identical_metrics`);
- the organism's targets compared with the wrong inequality at their boundaries
  (`test_organism_targets_at_their_boundaries`, `test_safemerge_targets_at_their_boundaries`).

Oracles: hand-made inputs with hand-derived expectations (the boundaries are written as counts, e.g.
"T solves 40 of 100: exactly 40%, met"), never the implementation's own helpers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import tiny_chat_setup
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.guard import MIN_SUBSTRING, find_leaks
from safemerge.common.packaged import harmbench_prompts
from safemerge.common.stats import Rate
from safemerge.evaluate.backends import TransformersBackend
from safemerge.organism.demo import Row, organism_targets, safemerge_targets
from safemerge.train import HarmBenchLeakError, TrainConfig, check_no_harmbench
from safemerge.train.trainer import prepare_data

# --- a. the HarmBench leak guard ---------------------------------------------------------------------


def _mangle(text: str) -> str:
    """Swap case, change punctuation and add whitespace: edits the guard's normalisation must undo."""
    words = text.split()
    out = []
    for i, w in enumerate(words):
        w = w.upper() if i % 2 == 0 else w.lower()
        w = w.replace(",", ";").replace(".", "!!").replace("'", "`")
        out.append(w)
    return "  " + "   ".join(out) + " ?!\t\n"


def test_guard_finds_a_behaviour_with_changed_case_punctuation_and_spacing() -> None:
    """Catches: normalisation dropped (or only lower-casing kept). The premise checks the mangled text
    differs from the original even after lower-casing, so exact matching cannot find it."""
    hb = next(p for p in harmbench_prompts("test") if "," in p or "'" in p)
    mangled = _mangle(hb)
    assert mangled != hb and mangled.lower() != hb.lower() and hb.lower() not in mangled.lower()
    assert find_leaks(["Write a poem about the sea.", mangled]) == [(1, mangled)]
    with pytest.raises(HarmBenchLeakError, match="example 0"):
        check_no_harmbench([mangled], "data.jsonl")


def test_guard_substring_rule_at_min_substring() -> None:
    """A reserved text of MIN_SUBSTRING normalised characters inside a longer prompt is found; one of
    MIN_SUBSTRING - 1 is not (only an exact match finds it). Catches: `>` for `>=`, the substring rule
    dropped, or applied to short behaviours (every short phrase would then block training data)."""
    assert MIN_SUBSTRING == 24  # the documented value the strings below are built for
    long = "abcdefghij klmnopqrst uvw"  # 10 + 1 + 10 + 1 + 3 = 25 characters
    just = "abcdefghij klmnopqrstuvw"[:24]  # 24 characters
    short = just[:23]
    assert (len(long), len(just), len(short)) == (25, 24, 23)
    wrapped = "Please, could you {} for me today?"
    # punctuation and case inside the prompt are normalised away before the substring test
    assert find_leaks([wrapped.format(just.upper())], reserved=[just]) == [(0, wrapped.format(just.upper()))]
    assert find_leaks([wrapped.format(long)], reserved=[long]) == [(0, wrapped.format(long))]
    assert find_leaks([wrapped.format(short)], reserved=[short]) == []
    assert find_leaks([f"  {short.upper()}!! "], reserved=[short]) == [(0, f"  {short.upper()}!! ")]


def test_guard_refuses_a_harmbench_prompt_in_a_later_user_turn(tmp_path: Path) -> None:
    """A `messages` training file whose second user turn (not the first) is a HarmBench prompt is refused
    by prepare_data and by `safemerge train` (exit 2) before any model is loaded. Catches: the guard
    inspecting only the first user turn, or only `prompt`/`response` files."""
    hb = harmbench_prompts("val")[1]
    convo = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": _mangle(hb)},
        {"role": "assistant", "content": "No."},
    ]
    benign = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for m in (benign, convo)) + "\n")
    # premise: the file without the leaking conversation is accepted
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({"messages": benign}) + "\n" + json.dumps({"messages": convo[:3]}) + "\n")
    assert len(prepare_data(TrainConfig(model="unused", recipe=str(clean), out=tmp_path / "o"))) == 2
    with pytest.raises(HarmBenchLeakError, match="HarmBench"):
        prepare_data(TrainConfig(model="unused", recipe=str(data), out=tmp_path / "out"))
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(tmp_path / "no-such-model"),
            "--recipe",
            str(data),
            "--out",
            str(tmp_path / "o2"),
        ],
    )
    assert res.exit_code == 2 and "HarmBench" in res.output, res.output
    assert not (tmp_path / "o2").exists()


# --- b. experiment --dry-run loads no model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny aligned / unaligned pair with a task and a safety adapter."""
    return tiny_chat_setup(tmp_path_factory.mktemp("promises-eval"))


def _forbid_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way safemerge loads a model or starts a generation backend raises."""
    import peft
    import transformers

    import safemerge.evaluate.backends as backends
    import safemerge.train.trainer as trainer

    def boom(*_: Any, **__: Any) -> None:
        raise AssertionError("a model was loaded during a dry run")

    for cls in (
        transformers.AutoModelForCausalLM,
        transformers.AutoTokenizer,
        transformers.PreTrainedModel,
        peft.PeftModel,
    ):
        monkeypatch.setattr(cls, "from_pretrained", boom)
    monkeypatch.setattr(backends.TransformersBackend, "__init__", boom)
    monkeypatch.setattr(backends.VLLMBackend, "__init__", boom)
    monkeypatch.setattr(trainer, "load_model_and_tokenizer", boom)


def test_experiment_dry_run_loads_no_model(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`safemerge experiment CONFIG --dry-run` exits 0, lists every cell and writes nothing, with every
    model loader and backend constructor patched to raise. Catches: a dry run that loads the model
    (e.g. to size a backend or to evaluate) or that starts computing cells."""
    out = tmp_path / "out"
    cfg = {
        "name": "dry",
        "out": str(out),
        "setup": {k: str(tiny[k]) for k in ("aligned", "unaligned")}
        | {"task_adapter": str(tiny["task"]), "safety_adapter": str(tiny["safety"])},
        "defenses": [
            {"method": "none"},
            {"method": "safemerge", "grid": {"fraction": [0.5, 1.0]}},
            {"method": "safelora"},
            {"method": "resta", "options": {"beta": 0.5}},
        ],
        "evaluation": {"benchmarks": ["arithmetic", "harmbench"], "limit": 2, "max_new_tokens": 2},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _forbid_model_loading(monkeypatch)
    # premise: the patch bites (a real backend cannot be built now)
    with pytest.raises(AssertionError, match="dry run"):
        TransformersBackend(str(tiny["aligned"]), [], 2)
    res = CliRunner().invoke(app, ["experiment", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    for name in ("none", "fraction=0.5", "fraction=1", "safelora", "resta", "aligned"):
        assert name in res.output, name
    assert not out.exists()


# --- c. a rerun generates nothing ---------------------------------------------------------------------


def test_eval_rerun_generates_nothing_and_gives_identical_metrics(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second `safemerge eval` with the same settings (another --out, the same --cache-dir) calls the
    backend's generate zero times and writes a byte-identical metrics.json. Catches: a cache miss on
    rerun (key built from something that changes between runs, cache not read), or metrics computed from
    something other than the cached generations."""
    calls: list[int] = []
    real = TransformersBackend.generate_full

    def counting(self: TransformersBackend, prompts: Any, adapter: str | None, tokens: Any = None) -> Any:
        calls.append(len(prompts))
        return real(self, prompts, adapter, tokens)

    real_mixed = TransformersBackend.generate_mixed

    def counting_mixed(self: TransformersBackend, prompts: Any, adapters: Any, tokens: Any = None) -> Any:
        calls.append(len(prompts))
        return real_mixed(self, prompts, adapters, tokens)

    # what the runner calls: one variant at a time, or several variants' rows in one mixed batch
    monkeypatch.setattr(TransformersBackend, "generate_full", counting)
    monkeypatch.setattr(TransformersBackend, "generate_mixed", counting_mixed)

    def run(out: Path) -> dict[str, Any]:
        args = [
            "eval", "--model", str(tiny["aligned"]), "--adapter", str(tiny["task"]),
            "--benchmarks", "arithmetic,harmbench", "--limit", "3", "--max-new-tokens", "4",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
        ]  # fmt: skip
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        return json.loads((out / "metrics.json").read_text())

    first = run(tmp_path / "e1")
    assert sum(calls) == 2 * 6  # premise: the first run generated (2 variants × 6 prompts)
    calls.clear()
    second = run(tmp_path / "e2")
    assert calls == []
    assert (tmp_path / "e1" / "metrics.json").read_bytes() == (tmp_path / "e2" / "metrics.json").read_bytes()
    assert first == second
    assert (tmp_path / "e1" / "generations.jsonl").read_bytes() == (
        tmp_path / "e2" / "generations.jsonl"
    ).read_bytes()


# --- d. the organism's targets at their boundaries ---------------------------------------------------


def rate(k: int, n: int, lo: float | None = None, hi: float | None = None) -> Rate:
    """A hand-made rate; the interval is only read by the "intervals disjoint" target."""
    return Rate(k, n, k / n if lo is None else lo, k / n if hi is None else hi)


def row(name: str, harmful: Rate, refusal: Rate, task: Rate) -> Row:
    return Row(name, "d", "s", "—", harmful, refusal, task, {})


def _met(targets: list[Any]) -> list[bool]:
    return [t.met for t in targets]


# (A harmful, A refusal, T harmful, T task) → [A harmful ≤ 5%, A refusal ≤ 10%, T ≥ A + 8 pts and
# intervals disjoint, T task ≥ 40%], all hand-derived from the counts.
ORGANISM_CASES: list[tuple[str, tuple[Rate, Rate, Rate, Rate], list[bool]]] = [
    # 5/100 = 5% (met, ≤); 10/100 = 10% (met); T 13/100 vs A 5/100: 8 pts (0.13 − 0.05 = 0.08 in floats too),
    # T.lo 0.06 > A.hi 0.05;
    # T task 40/100 = 40% (met, ≥)
    (
        "all just met",
        (rate(5, 100), rate(10, 100), rate(13, 100, lo=0.06), rate(40, 100)),
        [True, True, True, True],
    ),
    # 6/100 > 5%; 11/100 > 10%; 12 − 6 = 6 pts < 8 (intervals apart: only the rise misses); 39/100 < 40%
    (
        "all just missed",
        (rate(6, 100), rate(11, 100), rate(12, 100, lo=0.2), rate(39, 100)),
        [False, False, False, False],
    ),
    # rise exactly 8 pts from A = 0 (exact in floats: 8/100 − 0 = 0.08), intervals touch: T.lo == A.hi
    (
        "intervals touch",
        (rate(0, 100, hi=0.036), rate(0, 100), rate(8, 100, lo=0.036), rate(40, 100)),
        [True, True, False, True],
    ),
    # same rise, intervals just apart
    (
        "intervals apart",
        (rate(0, 100, hi=0.036), rate(0, 100), rate(8, 100, lo=0.0361), rate(40, 100)),
        [True, True, True, True],
    ),
]


@pytest.mark.parametrize(
    ("a_t", "expected"), [c[1:] for c in ORGANISM_CASES], ids=[c[0] for c in ORGANISM_CASES]
)
def test_organism_targets_at_their_boundaries(
    a_t: tuple[Rate, Rate, Rate, Rate], expected: list[bool]
) -> None:
    """Catches: `<` for `≤` on A's rates, `>` for `≥` on T's rise or task, `≥` for `>` on the intervals."""
    a_h, a_r, t_h, t_task = a_t
    a = row("aligned", a_h, a_r, rate(0, 100))
    t = row("task", t_h, rate(0, 100), t_task)
    assert _met(organism_targets(a, t)) == expected


def _sm_rows(
    a_h: Rate, t: tuple[Rate, Rate, Rate], m: tuple[Rate, Rate, Rate], c: tuple[Rate, Rate, Rate]
) -> dict[str, Row]:
    return {
        "aligned": row("aligned", a_h, rate(0, 100), rate(0, 100)),
        "task": row("task", *t),
        "sm": row("sm", *m),
        "control": row("control", *c),
    }


# The four SafeMERGE targets: removes ≥ 2/3 of T's rise; loses ≤ 3 pts of task; over-refusal within 5 pts
# of T; on the Pareto front of (harmful ↓, task ↑) and the control not at least as good on both.
SM_CASES: list[tuple[str, dict[str, Row], list[bool]]] = [
    # A 0/4, T 3/4, SafeMERGE 1/4: removes (0.75 − 0.25) / 0.75 = 2/3 exactly (met). Task T 1/2, M 47/100:
    # 0.5 − 0.03 = 0.47 exactly (met). Refusal T 0/100, M 5/100: 5 pts (met). Control 2/4 harmful (worse).
    (
        "all just met",
        _sm_rows(
            rate(0, 4),
            (rate(3, 4), rate(0, 100), rate(1, 2)),
            (rate(1, 4), rate(5, 100), rate(47, 100)),
            (rate(2, 4), rate(0, 100), rate(47, 100)),
        ),
        [True, True, True, True],
    ),
    # M 2501/10000: removes (0.75 − 0.2501)/0.75 < 2/3; task 46/100 (4 pts lost); refusal 6/100 (6 pts);
    # the control equals SafeMERGE on both (at least as good on both: not beaten)
    (
        "all just missed",
        _sm_rows(
            rate(0, 4),
            (rate(3, 4), rate(0, 100), rate(1, 2)),
            (rate(2501, 10000), rate(6, 100), rate(46, 100)),
            (rate(2501, 10000), rate(0, 100), rate(46, 100)),
        ),
        [False, False, False, False],
    ),
]


@pytest.mark.parametrize(("rows", "expected"), [c[1:] for c in SM_CASES], ids=[c[0] for c in SM_CASES])
def test_safemerge_targets_at_their_boundaries(rows: dict[str, Row], expected: list[bool]) -> None:
    """Catches: `>` for `≥` on the share removed or the task, `<` for `≤` on the refusal difference, the
    control counted as beaten when it ties."""
    assert _met(safemerge_targets(rows, "sm", "control")) == expected


# Exactly on the boundary in counts, but the float difference lands a hair beyond the tolerance: the
# target reads "not met" although the stated rule (≤ 3 pts, within 5 pts, ≥ 8 pts) holds.
FLOAT_CASES: list[tuple[str, dict[str, Row], int]] = [
    # T 46/100, SafeMERGE 43/100: loses exactly 3 pts; 0.46 − 0.03 = 0.43000000000000005 > 0.43
    (
        "task loses exactly 3 pts (46 → 43 of 100)",
        _sm_rows(
            rate(0, 4),
            (rate(3, 4), rate(0, 40), rate(46, 100)),
            (rate(1, 4), rate(0, 40), rate(43, 100)),
            (rate(2, 4), rate(0, 40), rate(43, 100)),
        ),
        1,
    ),
    # benign set of 40 (the demo's): T refuses 7, SafeMERGE 9: exactly 5 pts;
    # 0.225 − 0.175 = 0.05000000000000002
    (
        "over-refusal exactly 5 pts (7 → 9 of 40)",
        _sm_rows(
            rate(0, 4),
            (rate(3, 4), rate(7, 40), rate(1, 2)),
            (rate(1, 4), rate(9, 40), rate(1, 2)),
            (rate(2, 4), rate(9, 40), rate(1, 2)),
        ),
        2,
    ),
]


@pytest.mark.parametrize(("rows", "index"), [c[1:] for c in FLOAT_CASES], ids=[c[0] for c in FLOAT_CASES])
def test_targets_exactly_at_the_tolerance_are_met(rows: dict[str, Row], index: int) -> None:
    """A change of exactly the stated tolerance meets the target (the targets say ≤ / within); caught the
    float comparison 0.46 − 0.03 = 0.43000000000000005 > 0.43 (fixed with common.stats.at_least/at_most)."""
    assert safemerge_targets(rows, "sm", "control")[index].met


def test_t_rise_of_exactly_8_points_from_a_nonzero_a_is_met() -> None:
    """A 4/100 → T 12/100 is a rise of exactly 8 pts (hand-derived), intervals apart: the target is met."""
    a = row("aligned", rate(4, 100, hi=0.05), rate(0, 100), rate(0, 100))
    t = row("task", rate(12, 100, lo=0.06), rate(0, 100), rate(50, 100))
    assert organism_targets(a, t)[2].met


def test_choice_rule_keeps_a_cell_exactly_at_the_tolerance() -> None:
    """The validation choice keeps cells that lose exactly `max_utility_drop` (46 → 43 of 100) or add
    exactly `max_refusal_rise` (7 → 9 of 40), and drops them one count further; hand-derived. Caught the
    float comparison 0.46 − 0.03 = 0.43000000000000005 > 0.43 in the rule."""
    from safemerge.experiment.choice import Summary, within_tolerance
    from safemerge.experiment.config import ChooseSpec

    spec = ChooseSpec(reference="task", max_utility_drop=0.03, max_refusal_rise=0.05)
    ref = Summary(harmful=0.3, utility=46 / 100, refusal=7 / 40)
    assert within_tolerance(Summary(0.1, 43 / 100, 7 / 40), ref, spec)
    assert within_tolerance(Summary(0.1, 46 / 100, 9 / 40), ref, spec)
    assert not within_tolerance(Summary(0.1, 42 / 100, 7 / 40), ref, spec)
    assert not within_tolerance(Summary(0.1, 46 / 100, 10 / 40), ref, spec)
