"""Train -> eval end to end on a tiny Llama built offline; resume; bad input."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tinymodel import build_tiny_model
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.evaluate import EvalConfig, TransformersBackend, evaluate

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base model, an adapter trained on it with `safemerge train`, and an unrelated model."""
    root = tmp_path_factory.mktemp("e2e")
    model = build_tiny_model(root / "model")
    other = build_tiny_model(root / "other", hidden=48)
    adapter = root / "adapter"
    args = [
        "train",
        "--model",
        str(model),
        "--recipe",
        "arithmetic",
        "--out",
        str(adapter),
        "--samples",
        "96",
        "--max-steps",
        "24",
        "--batch-size",
        "8",
        "--lr",
        "0.03",
        "--target-modules",
        ALL_LINEAR,
        "--lora-r",
        "16",
        "--seed",
        "0",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return {"root": root, "model": model, "other": other, "adapter": adapter}


def test_train_outputs_and_loss_goes_down(trained: dict[str, Path]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = trained["adapter"]
    for f in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_config.yaml",
        "train_log.jsonl",
        "loss_curve.png",
    ):
        assert (a / f).is_file(), f
    losses = [
        json.loads(x)["loss"] for x in (a / "train_log.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert len(losses) == 24
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    cfg = json.loads((a / "adapter_config.json").read_text())
    assert (
        cfg["r"] == 16
        and cfg["lora_dropout"] == 0.0
        and set(cfg["target_modules"]) == set(ALL_LINEAR.split(","))
    )
    assert (
        "lora_rank" not in (a / "train_config.yaml").read_text()
        and "seed: 0" in (a / "train_config.yaml").read_text()
    )
    base = AutoModelForCausalLM.from_pretrained(trained["model"])
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    peft = PeftModel.from_pretrained(base, a)
    assert not torch.allclose(peft(ids).logits, before)


def test_eval_writes_all_files(trained: dict[str, Path]) -> None:
    out = trained["root"] / "eval"
    args = [
        "eval",
        "--model",
        str(trained["model"]),
        "--adapter",
        str(trained["adapter"]),
        "--benchmarks",
        "arithmetic,harmbench,strongreject,overrefusal",
        "--limit",
        "5",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        "--cache-dir",
        str(trained["root"] / "cache"),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {
        ".safemerge-output",
        "generations.jsonl",
        "metrics.json",
        "summary.md",
        "eval_config.yaml",
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == [str(trained["model"]), str(trained["adapter"])]
    m = metrics[str(trained["adapter"])]["benchmarks"]
    assert m["arithmetic"]["n"] == 5 and 0 <= m["arithmetic"]["accuracy"] <= 1
    assert m["harmbench"]["judge"].startswith("keyword") and "proxy" in m["harmbench"]["judge"]
    assert m["harmbench"]["harmful_rate"] == m["harmbench"]["n_unsafe"] / 5
    assert set(m["overrefusal"]) >= {"refusal_rate", "n_refused"}
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 * 4 * 5
    assert {"prompt", "response", "verdict", "judge_output"} <= set(gens[0])
    assert "proxy" in (out / "summary.md").read_text()
    # an existing output directory is never overwritten without --force
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--force" in res.output


class Counting:
    """Wraps a backend: counts generated prompts and can die after some batches, like a killed run."""

    def __init__(self, inner: TransformersBackend, fail_after: int | None = None) -> None:
        self.inner, self.fail_after = inner, fail_after
        self.name, self.dtype = inner.name, inner.dtype
        self.calls = self.prompts = 0

    def generate(self, prompts: Sequence[str], adapter: str | None) -> list[str]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.prompts += len(prompts)
        return self.inner.generate(prompts, adapter)

    def close(self) -> None:
        pass


def test_resume_generates_only_missing_and_matches(trained: dict[str, Path]) -> None:
    root = trained["root"]
    inner = TransformersBackend(str(trained["model"]), [str(trained["adapter"])], max_new_tokens=8)

    def cfg(out: str, cache: str) -> EvalConfig:
        return EvalConfig(
            model=str(trained["model"]),
            adapters=[str(trained["adapter"])],
            benchmarks=["arithmetic", "harmbench"],
            out=root / out,
            limit=6,
            batch_size=4,
            max_new_tokens=8,
            cache_dir=root / cache,
        )

    # 2 variants x one stream of 12 prompts (both benchmarks) x 3 batches of 4 = 6 batches, 24 prompts
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg("r1", "c1"), backend=Counting(inner, fail_after=2))  # type: ignore[arg-type]
    assert not (root / "r1").exists()
    resumed = Counting(inner)
    evaluate(cfg("r1", "c1"), backend=resumed)  # type: ignore[arg-type]
    assert resumed.calls == 4  # the base model's last batch, then the adapter's three
    done_first = 4 + 4  # the two batches of the killed run
    assert resumed.prompts == 24 - done_first
    again = Counting(inner)
    evaluate(cfg("r1b", "c1"), backend=again)  # type: ignore[arg-type]
    assert again.calls == 0  # everything cached
    fresh = Counting(inner)
    evaluate(cfg("r2", "c2"), backend=fresh)  # type: ignore[arg-type]
    assert fresh.prompts == 24
    for f in ("generations.jsonl", "metrics.json"):
        assert (root / "r1" / f).read_text() == (root / "r2" / f).read_text()


def _eval(trained: dict[str, Path], out: Path, *extra: str) -> Any:
    args = [
        "eval",
        "--model",
        str(trained["model"]),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--no-cache",
    ]
    return CliRunner().invoke(app, args + list(extra))


def test_bad_inputs(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    # an adapter trained on another base model
    res = _eval(
        {**trained, "model": trained["other"]},
        out,
        "--adapter",
        str(trained["adapter"]),
        "--benchmarks",
        "harmbench",
        "--limit",
        "2",
    )
    assert res.exit_code == 2 and str(trained["adapter"]) in res.output and "does not fit" in res.output
    # unknown benchmark
    res = _eval(trained, out, "--benchmarks", "arithmetic,harmbnech")
    assert res.exit_code == 2 and "unknown benchmark 'harmbnech'" in res.output
    # empty prompt set
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "   "}\n')
    res = _eval(trained, out, "--benchmarks", str(empty))
    assert res.exit_code == 2 and "empty.jsonl" in res.output and "no prompts" in res.output
    # prompts file without a prompt column
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"text": "hello"}\n')
    res = _eval(trained, out, "--benchmarks", str(nocol))
    assert res.exit_code == 2 and "nocol.jsonl" in res.output and "`prompt`" in res.output
    # not an adapter directory (one that does not hold `out`: an output never overlaps an input)
    plain = tmp_path / "plain"
    plain.mkdir()
    res = _eval(trained, out, "--adapter", str(plain), "--benchmarks", "harmbench")
    assert res.exit_code == 2 and "adapter_config.json" in res.output
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_training_is_deterministic(trained: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    from safemerge.train import TrainConfig, train

    def run(out: str) -> dict[str, Any]:
        cfg = TrainConfig(
            model=str(trained["model"]),
            recipe="safety",
            samples=16,
            max_steps=3,
            batch_size=4,
            seed=7,
            out=trained["root"] / out,
        )
        train(cfg)
        return load_file(trained["root"] / out / "adapter_model.safetensors")

    a, b = run("det1"), run("det2")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # it did train


def test_llama_guard_plumbing_with_a_stand_in_model(trained: dict[str, Path]) -> None:
    """The llama-guard path end to end, with the tiny model standing in for Llama Guard (its output is
    noise, so verdicts are mostly malformed: they must be counted, not guessed)."""
    root = trained["root"]
    cfg = EvalConfig(
        model=str(trained["model"]),
        benchmarks=["harmbench"],
        out=root / "lg",
        limit=3,
        max_new_tokens=4,
        judge="llama-guard",
        judge_model=str(trained["model"]),
        cache_dir=root / "lgcache",
    )
    m = evaluate(cfg)[str(trained["model"])]["benchmarks"]["harmbench"]
    assert m["judge"] == f"llama-guard ({trained['model']})"
    gens = [json.loads(x) for x in (root / "lg" / "generations.jsonl").read_text().splitlines()]
    assert m["n_malformed"] == sum(g["verdict"] == "malformed" for g in gens)
    assert m["n_unsafe"] == sum(g["verdict"] == "unsafe" for g in gens)
    assert all(isinstance(g["judge_output"], str) for g in gens)
    assert list((root / "lgcache" / "judge").glob("*.jsonl"))  # judge outputs are cached too


def test_adapter_added_later_matches_one_loaded_up_front(trained: dict[str, Path]) -> None:
    prompts = ["What is 123 + 456?", "Name a colour."]
    upfront = TransformersBackend(str(trained["model"]), [str(trained["adapter"])], max_new_tokens=6)
    later = TransformersBackend(str(trained["model"]), [], max_new_tokens=6)
    base_answers = later.generate(prompts, None)
    later.add_adapter(str(trained["adapter"]))
    later.add_adapter(str(trained["adapter"]))  # twice: attached once
    assert len(later.names) == 1
    adapter = str(trained["adapter"])
    assert later.generate(prompts, adapter) == upfront.generate(prompts, adapter)
    assert later.generate(prompts, None) == base_answers
