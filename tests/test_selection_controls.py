"""SafeMERGE's selection controls: the highest-ρ modules (`inverse`) and seeded random draws (`random`)
of the chosen cell's size, checked against hand-made ρ lists and, on tiny models, against the scan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import save_adapter, save_pair
from pydantic import ValidationError

from safemerge.defenses import DefendConfig, defend
from safemerge.engine.config import SelectionConfig
from safemerge.engine.criterion import rank_modules, select_fraction, select_top_k
from safemerge.engine.pipeline import merge_config_yaml, select

RHOS = [0.30, 0.10, 0.50, 0.20, 0.40, 0.05]  # hand-made: lowest first 5, 1, 3, 0, 4, 2


def test_inverse_takes_the_highest_rho_first() -> None:
    assert rank_modules(RHOS) == [5, 1, 3, 0, 4, 2]
    assert rank_modules(RHOS, "highest") == [2, 4, 0, 3, 1, 5]  # the complement order
    assert select_top_k(RHOS, 2, order="highest") == [False, False, True, False, True, False]
    # k lowest and n − k highest partition the modules
    low, high = select_top_k(RHOS, 4), select_top_k(RHOS, 2, order="highest")
    assert [a != b for a, b in zip(low, high, strict=True)] == [True] * len(RHOS)
    assert select_fraction(RHOS, 0.5, order="highest") == select_top_k(RHOS, 3, order="highest")
    # ties by module order, `last` (zero-V modules) still ranked after every other module
    assert rank_modules([0.2, 0.2, 0.1], "highest") == [0, 1, 2]
    assert rank_modules(RHOS, "highest", last={2}) == [4, 0, 3, 1, 5, 2]


def test_random_draw_has_the_size_asked_and_is_reproducible_per_seed() -> None:
    rhos = [i / 40 for i in range(40)]
    draws = {s: select_top_k(rhos, 7, order="random", seed=s) for s in range(5)}
    for s, d in draws.items():
        assert sum(d) == 7
        assert select_top_k(rhos, 7, order="random", seed=s) == d  # same seed, same draw
        assert sorted(rank_modules(rhos, "random", s)) == list(range(40))  # a permutation
    assert len({tuple(d) for d in draws.values()}) == 5  # each seed draws another set
    assert draws[0] != select_top_k(rhos, 7)  # not the lowest ρ
    # zero-V modules are still ranked last: drawn only when nothing else is left
    assert rank_modules(rhos, "random", 3, last={0, 1})[-2:] in ([0, 1], [1, 0])


def test_random_needs_a_seed_and_orders_are_named() -> None:
    with pytest.raises(ValueError, match="needs a seed"):
        rank_modules(RHOS, "random")
    with pytest.raises(ValueError, match="order must be one of"):
        rank_modules(RHOS, "middle")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"order": "highest"}, "`order` highest ranks modules: give `top_k` or `fraction`"),
        ({"threshold": 0.3, "order": "random", "order_seed": 1}, "give `top_k` or `fraction`"),
        ({"top_k": 2, "order": "random"}, "order random needs order_seed"),
        ({"top_k": 2, "order_seed": 1}, "order_seed applies to order random only"),
        ({"top_k": 2, "order": "middle"}, "order"),
    ],
)
def test_bad_orders_are_refused(given: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SelectionConfig(**given)


def test_engine_select_passes_the_order_on() -> None:
    assert select(RHOS, SelectionConfig(top_k=2, order="highest")) == select_top_k(RHOS, 2, order="highest")
    sel = SelectionConfig(fraction=0.5, order="random", order_seed=4)
    assert select(RHOS, sel) == select_top_k(RHOS, 3, order="random", seed=4)
    assert sel.policy == "fraction (0.5, random draw seed 4)"
    assert SelectionConfig(top_k=2, order="highest").policy == "top-k (k=2, highest rho first)"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controls")
    al, un = save_pair(root, "llama", torch.float32)
    return {
        "aligned": al,
        "unaligned": un,
        "task": save_adapter(al, root / "task", seed=1, r=4, alpha=8),
        "safety": save_adapter(al, root / "safety", seed=2, r=4, alpha=16),
    }


def _cfg(env: dict[str, Path], out: Path, **kw: object) -> DefendConfig:
    return DefendConfig.from_flat(
        method="safemerge",
        aligned=str(env["aligned"]),
        unaligned=str(env["unaligned"]),
        task_adapter=str(env["task"]),
        safety_adapter=str(env["safety"]),
        out=str(out),
        plot=False,
        **kw,
    )


def test_safemerge_defence_merges_the_highest_or_a_random_draw(env: dict[str, Path], tmp_path: Path) -> None:
    low = defend(_cfg(env, tmp_path / "low", top_k=3))
    rho = {m.name: m.rho for m in low.report.modules}
    by_rho = sorted(rho, key=rho.__getitem__)
    inv = defend(_cfg(env, tmp_path / "inv", top_k=3, order="highest"))
    assert {m.name for m in inv.report.modules if m.merged} == set(by_rho[-3:])
    assert {m.name for m in low.report.modules if m.merged} == set(by_rho[:3])
    names = [m.name for m in low.report.modules]
    drawn = select_top_k([rho[n] for n in names], 3, order="random", seed=7)
    rnd = defend(_cfg(env, tmp_path / "rnd", top_k=3, order="random", order_seed=7))
    assert [m.merged for m in rnd.report.modules] == drawn and rnd.modified == 3
    assert "order: random" in (tmp_path / "rnd" / "safemerge.yaml").read_text()


def test_default_selection_reads_as_before(env: dict[str, Path], tmp_path: Path) -> None:
    """Left at the lowest ρ, the order is absent from the settings (experiment cache keys) and dumps."""
    cfg = _cfg(env, tmp_path / "o", threshold=0.3)
    assert "order" not in cfg.settings() and "order_seed" not in cfg.settings()
    assert "order" not in merge_config_yaml(cfg.merge_config("x"))
    assert _cfg(env, tmp_path / "o", top_k=2, order="highest").settings()["order"] == "highest"


def test_experiment_seeds_pool_each_draw_under_its_own_key() -> None:
    """Over experiment seeds, the random control's draws keep distinct row keys (not one overwritten)."""
    from types import SimpleNamespace
    from typing import Any, cast

    from safemerge.experiment.cells import Cell
    from safemerge.experiment.seeds import row_key

    cfg = cast(Any, SimpleNamespace(defenses=[SimpleNamespace(name=None, method="safemerge")]))
    keys = []
    for control, draw in (("inverse", None), ("random", 0), ("random", 1)):
        cell = Cell("x", "safemerge", {}, {}, "x", (), spec=0, control=control, role="derived")
        cell.draw = draw
        keys.append(row_key(cfg, cell))
    assert keys == ["safemerge inverse", "safemerge random 0", "safemerge random 1"]
