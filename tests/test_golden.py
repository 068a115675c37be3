"""Golden test: `safemerge scan`, `merge` and `defend` must write byte-identical files to the recorded ones.

The inputs are the tiny committed models and adapters in tests/fixtures/golden/inputs (built once by
make_fixture.py, never regenerated here). Each case runs the CLI in a temp directory holding a copy of
them, with relative paths only, so paths inside the reports are the same on every run and machine. Every
file of the output directory is hashed (sha256) and compared with tests/fixtures/golden/expected.json.

Normalisation (`normalised_bytes`), nothing else:
1. JSON files: the top-level key `versions` (library versions, in safemerge_report.json) is dropped and
   the rest re-serialised with json.dumps(indent=2, ensure_ascii=False), key order kept (so reordered
   keys still fail). The other version stamps (transformers_version in config.json and
   generation_config.json, peft_version in adapter_config.json) are NOT normalised: they only change
   with a library upgrade, which may change other bytes too (re-record then, noting it in CHANGELOG.md).
2. Decimal numbers in JSON and Markdown files (`1.25`, `0.2989`, `3e-05`) are compared with a tolerance,
   everything around them byte for byte: each such file is recorded as the sha256 of its text with every
   decimal replaced by `#` and the list of decimals. A decimal matches when it is within a relative 1e-6
   of the recorded one, or one unit of its last printed digit (a 4-decimal `0.2989` may print `0.2988` on
   another CPU when the value lies on a rounding edge). Why: ρ's two products with V run in float32 on
   MKL, whose kernels differ between CPUs (AVX-512, AVX2, AMD): measured 2026-12-06 with MKL_CBWR=SSE4_2
   against the default on one machine, ρ differed by up to 3.4e-8 relative, and float64 norms in the last
   bit. Integers (counts, ranks, shapes) and all other text stay exact.
3. safetensors files: the header (tensor names, dtypes, shapes, offsets, metadata) exactly, and each
   tensor's values by three float64 numbers — its sum, its norm and its dot product with a fixed seeded
   random vector — each within 1e-5 · the tensor's norm (+1e-12). The same MKL measurement changed the
   float32 products behind `--merge-into-base`, RESTA and the TIES/DARE SVD in the last bits; a change of
   the code's output moves the random projection far more than that.
4. YAML files (the resolved `safemerge.yaml` / `defense.yaml`, which record local inputs and `out` as
   absolute paths so that they rerun from any directory): the working directory of the run (a case's
   temporary directory) followed by a path separator is removed, so they read as the relative paths given.
Everything else, PNG plots included, is compared byte for byte: two runs of the same code, in different
directories, give identical bytes for every other file (test_golden_outputs_are_byte_identical_per_run
keeps the byte-for-byte check of the whole output on one machine).
(Until 2026-11-29 `defend -m safemerge/merge-all`
recorded the temporary directory of its inner merge as `out` in safemerge.yaml and the report, a random
name that needed normalising; they now record the final `out`, as CHANGELOG.md says.)

Re-recording (`python tests/fixtures/golden/record.py --write`) is only allowed for an INTENDED change of the
output, which must be noted in CHANGELOG.md; a refactor must pass this test unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
INPUTS = GOLDEN / "inputs"
EXPECTED = GOLDEN / "expected.json"

LLAMA = ["-a", "llama/aligned", "-u", "llama/unaligned", "-t", "llama/task"]
LLAMA_S = [*LLAMA, "-s", "llama/safety"]
GPT2_S = ["-a", "gpt2/aligned", "-u", "gpt2/unaligned", "-t", "gpt2/task", "-s", "gpt2/safety"]

# case name → CLI arguments; run_case adds `--out <case name> --quiet` (a relative output directory).
CASES: dict[str, list[str]] = {
    "scan": ["scan", *LLAMA],
    "merge-exact": ["merge", *LLAMA_S],
    "merge-peft-linear": ["merge", *LLAMA_S, "--mode", "peft-linear"],
    "merge-dare-ties": ["merge", *LLAMA_S, "--method", "dare_ties", "--seed", "3", "--density", "0.5"],
    "merge-into-base-llama": ["merge", *LLAMA_S, "--merge-into-base"],
    "merge-into-base-gpt2": ["merge", *GPT2_S, "--merge-into-base"],
    "merge-top-k-2": ["merge", *LLAMA_S, "--top-k", "2"],
    "defend-safemerge": ["defend", "-m", "safemerge", *LLAMA_S],
    "defend-merge-all": ["defend", "-m", "merge-all", *LLAMA_S],
    "defend-safelora": ["defend", "-m", "safelora", *LLAMA],
    "defend-safelora-preserve-norm": ["defend", "-m", "safelora", *LLAMA, "--preserve-norm"],
    "defend-resta": ["defend", "-m", "resta", *LLAMA],
    "defend-resta-dare": ["defend", "-m", "resta", *LLAMA, "--dare", "--seed", "1"],
    "defend-none": ["defend", "-m", "none", *LLAMA],
}


TEXT_SUFFIXES = {".json", ".yaml", ".md"}


def normalised_bytes(path: Path) -> bytes:
    """The bytes that are hashed: the file's, normalised as the module docstring says."""
    data = path.read_bytes()
    if path.suffix not in TEXT_SUFFIXES:
        return data
    if path.suffix == ".yaml":  # resolved configs record local paths absolute (point 4)
        return data.replace(f"{Path.cwd()}{os.sep}".encode(), b"")
    if path.suffix != ".json":
        return data
    obj = json.loads(data)
    if isinstance(obj, dict):
        obj.pop("versions", None)  # library versions: change with the environment, not with the code
    return json.dumps(obj, indent=2, ensure_ascii=False).encode()


# A decimal number not inside a word, a hex digest or a longer number: 0.2989, -1.5, 3e-05, 1.2E+3.
DECIMAL = re.compile(r"(?<![\w.])-?\d+(?:\.\d+(?:[eE][-+]?\d+)?|[eE][-+]?\d+)(?![\w.])")
Fingerprint = str | dict[str, object]  # a sha256, or {"masked_sha256": …, "decimals": […]} (point 2)


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of the normalised bytes of every file under `root`, keyed by its relative POSIX path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(normalised_bytes(p)).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tensor_summary(path: Path) -> Fingerprint:
    """A safetensors file as its header's sha256 and (sum, norm, projection) per tensor (point 3)."""
    import torch
    from safetensors import safe_open

    raw = path.read_bytes()
    header = raw[: 8 + int.from_bytes(raw[:8], "little")]
    values = {}
    with safe_open(str(path), framework="pt") as fh:
        for key in sorted(fh.keys()):
            t = fh.get_tensor(key).to(torch.float64).flatten()
            probe = torch.randn(t.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            values[key] = [float(t.sum()), float(t.norm()), float(t @ probe)]
    return {"header_sha256": hashlib.sha256(header).hexdigest(), "tensors": values}


def fingerprint(path: Path) -> Fingerprint:
    """What is recorded of one output file: its sha256; for JSON / Markdown the sha256 of its text with
    decimals masked and the decimals themselves (as printed); for safetensors `tensor_summary`."""
    if path.suffix == ".safetensors":
        return tensor_summary(path)
    data = normalised_bytes(path)
    if path.suffix not in (".json", ".md"):
        return hashlib.sha256(data).hexdigest()
    text = data.decode()
    masked = DECIMAL.sub("#", text)
    return {"masked_sha256": hashlib.sha256(masked.encode()).hexdigest(), "decimals": DECIMAL.findall(text)}


def fingerprint_tree(root: Path) -> dict[str, Fingerprint]:
    return {p.relative_to(root).as_posix(): fingerprint(p) for p in sorted(root.rglob("*")) if p.is_file()}


def decimal_close(got: str, want: str) -> bool:
    """Within a relative 1e-6, or one unit of the last digit `want` prints (module docstring, point 2)."""
    g, w = float(got), float(want)
    mantissa = want.lower().split("e")[0]
    exponent = int(want.lower().split("e")[1]) if "e" in want.lower() else 0
    places = len(mantissa.split(".")[1]) if "." in mantissa else 0
    unit = 10.0 ** (exponent - places)
    return math.isclose(g, w, rel_tol=1e-6) or abs(g - w) <= unit * (1 + 1e-9)


def same_tensors(got: dict[str, object], want: dict[str, object]) -> bool:
    g, w = got["tensors"], want["tensors"]
    assert isinstance(g, dict) and isinstance(w, dict)
    return (
        got["header_sha256"] == want["header_sha256"]
        and g.keys() == w.keys()
        and all(abs(a - b) <= 1e-5 * w[k][1] + 1e-12 for k in w for a, b in zip(g[k], w[k], strict=True))
    )


def same_file(got: Fingerprint, want: Fingerprint) -> bool:
    if isinstance(got, str) or isinstance(want, str):
        return got == want
    if "tensors" in want:
        return same_tensors(got, want)
    g, w = got["decimals"], want["decimals"]
    assert isinstance(g, list) and isinstance(w, list)
    return (
        got["masked_sha256"] == want["masked_sha256"]
        and len(g) == len(w)
        and all(decimal_close(a, b) for a, b in zip(g, w, strict=True))
    )


def run_case(name: str, workdir: Path) -> dict[str, Fingerprint]:
    """Run case `name` in `workdir`, the current directory (with a copy of the inputs); fingerprint its
    output."""
    from safemerge.cli import app

    args = [*CASES[name], "--out", name, "--quiet"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, f"{name} failed ({result.exit_code}): {result.output}\n{result.exception!r}"
    return fingerprint_tree(workdir / name)


def copy_inputs(workdir: Path) -> None:
    shutil.copytree(INPUTS, workdir, dirs_exist_ok=True)


def differing(got: dict[str, Fingerprint], want: dict[str, Fingerprint]) -> list[str]:
    return [f for f in sorted(want.keys() & got.keys()) if not same_file(got[f], want[f])]


def diff_message(name: str, got: dict[str, Fingerprint], want: dict[str, Fingerprint]) -> str:
    lines = [f"golden output of {name!r} changed:"]
    lines += [f"  missing:    {f}" for f in sorted(want.keys() - got.keys())]
    lines += [f"  unexpected: {f}" for f in sorted(got.keys() - want.keys())]
    lines += [f"  differs:    {f}" for f in differing(got, want)]
    return "\n".join(lines)


def load_expected() -> dict[str, dict[str, Fingerprint]]:
    return dict(json.loads(EXPECTED.read_text()))


def test_every_case_is_recorded() -> None:
    assert sorted(load_expected()) == sorted(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_golden_outputs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    want = load_expected()[name]
    got = run_case(name, tmp_path)
    assert got.keys() == want.keys() and not differing(got, want), diff_message(name, got, want)


def test_golden_outputs_are_byte_identical_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Determinism on one machine: two runs of the same cases, in different directories, give the same
    bytes for every file (no tolerance: that is only for other CPUs)."""
    runs = []
    for run in ("a", "b"):
        work = tmp_path / run
        copy_inputs(work)
        monkeypatch.chdir(work)
        runs.append({n: (run_case(n, work), hash_tree(work / n)) for n in ("merge-exact", "defend-resta")})
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    ("got", "want", "close"),
    [
        ("0.29885416", "0.2988541688", True),  # relative 3e-9
        ("0.2988", "0.2989", True),  # one unit of the printed last digit (a rounding edge)
        ("0.2987", "0.2989", False),
        ("0.30", "0.2989", False),
        ("3.1e-05", "3e-05", True),  # one unit of the mantissa's last digit: 1e-5
        ("4.1e-05", "3e-05", False),
        ("0.9183575", "0.9183565148434849", False),  # 1.1e-6 relative
    ],
)
def test_decimal_tolerance(got: str, want: str, close: bool) -> None:
    assert decimal_close(got, want) is close


def test_the_mask_leaves_integers_hashes_and_names_exact() -> None:
    text = 'layers.10 "rank": 8, "sha256": "9f99e0ed1a3", "rho": 0.29885, "x": 3e-05, -1.5'
    assert DECIMAL.findall(text) == ["0.29885", "3e-05", "-1.5"]
