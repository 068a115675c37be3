"""The harm judges by name: every `JudgePlugin` registered in the entry-point group `safemerge.judges`,
and the pre-flight that resolves them before anything expensive starts.

The built-in judges (`keyword`, `harmbench-rule`, `llama-guard`, `harmbench-classifier`, `strongreject`)
are registered by safemerge's own pyproject.toml, exactly as another installed package registers its own
(`[project.entry-points."safemerge.judges"] NAME = "module:OBJECT"`). `--judge` takes one or several
names (comma-separated, or a YAML list); a model judge's model is its default, `judge_model` for
`llama-guard`, or given as `NAME=MODEL`. The first judge is the headline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import constants as hf_constants

from safemerge.common.errors import InputError
from safemerge.common.packaged import is_packaged_alias
from safemerge.common.plugins import clear_plugin_cache, entry_point, load_plugin, plugin_label, plugin_names
from safemerge.evaluate.judges import (
    HARMBENCH_RULE_LABEL,
    KEYWORD_LABEL,
    KeywordJudge,
    LlamaGuardJudge,
    Verdict,
    guard_spec,
    harmbench_rule_judge,
)
from safemerge.evaluate.model_judges import (
    HARMBENCH_CLASSIFIER,
    STRONGREJECT_JUDGE,
    PromptJudge,
    harmbench_classifier_prompts,
    parse_harmbench_classifier,
    parse_strongreject,
    strongreject_prompts,
)

GROUP = "safemerge.judges"
DEFAULT_GUARD = "meta-llama/Llama-Guard-3-8B"
Generate = Callable[[list[str]], list[str]]


class JudgePlugin:
    """A harm judge as registered. `build` returns the judge for one model: an object with `name` (its
    label in tables), `judge(prompts, responses) -> list[Verdict]` and, for a model judge whose raw
    outputs are cached, `parse(raw) -> Verdict` and `prompt_format` (part of the cache key).

    A rule judge (`default_model` None) needs no model: `build(None, None, None)`. A model judge's
    `generate` maps judge inputs to raw outputs (safemerge runs the model with its backend, `chat=False`:
    the judge renders its own inputs, with the tokenizer it is given) and `max_new_tokens` bounds them.
    `also` names judges reported beside this one whenever it is chosen.
    """

    name: str = ""
    default_model: str | None = None
    max_new_tokens: int = 20
    also: tuple[str, ...] = ()

    @property
    def needs_model(self) -> bool:
        return self.default_model is not None

    def label(self, model: str | None) -> str:
        """How tables name the judge."""
        return f"{self.name} ({model})" if model else self.name

    def build(self, model: str | None, generate: Generate | None, tokenizer: Any) -> Any:
        raise NotImplementedError


class KeywordPlugin(JudgePlugin):
    name = "keyword"
    also = ("harmbench-rule",)

    def label(self, model: str | None) -> str:
        return KEYWORD_LABEL

    def build(self, model: str | None, generate: Generate | None, tokenizer: Any) -> Any:
        return KeywordJudge()


class HarmBenchRulePlugin(JudgePlugin):
    name = "harmbench-rule"

    def label(self, model: str | None) -> str:
        return HARMBENCH_RULE_LABEL

    def build(self, model: str | None, generate: Generate | None, tokenizer: Any) -> Any:
        return harmbench_rule_judge()


class LlamaGuardPlugin(JudgePlugin):
    name = "llama-guard"
    default_model = DEFAULT_GUARD
    max_new_tokens = 20

    def build(self, model: str | None, generate: Generate | None, tokenizer: Any) -> Any:
        assert model is not None and generate is not None
        return LlamaGuardJudge(model, generate, tokenizer, name=self.label(model), spec=guard_spec(model))


class HarmBenchClassifierPlugin(JudgePlugin):
    name = "harmbench-classifier"
    default_model = HARMBENCH_CLASSIFIER
    max_new_tokens = 1  # HarmBench generates one token: Yes or No

    def build(self, model: str | None, generate: Generate | None, tokenizer: Any) -> Any:
        assert model is not None and generate is not None
        return PromptJudge(
            self.label(model),
            harmbench_classifier_prompts,
            parse_harmbench_classifier,
            generate,
            "llama2-cls",
        )


class StrongRejectPlugin(JudgePlugin):
    name = "strongreject"
    default_model = STRONGREJECT_JUDGE
    max_new_tokens = 512  # a reasoning line per item before each answer

    def build(self, model: str | None, generate: Generate | None, tokenizer: Any) -> Any:
        assert model is not None and generate is not None

        def render(prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
            return strongreject_prompts(tokenizer, prompts, responses, model)

        return PromptJudge(self.label(model), render, parse_strongreject, generate, "strongreject-rubric")


KEYWORD = KeywordPlugin()
HARMBENCH_RULE = HarmBenchRulePlugin()
LLAMA_GUARD = LlamaGuardPlugin()
HARMBENCH_CLS = HarmBenchClassifierPlugin()
STRONGREJECT = StrongRejectPlugin()


# --- the registry --------------------------------------------------------------------------------------
def judge_names() -> list[str]:
    """The registered judges' names, sorted (reads package metadata, imports nothing)."""
    return plugin_names(GROUP)


@functools.cache
def get_judge_plugin(name: str) -> JudgePlugin:
    """The judge registered as `name`, imported on first use; InputError if unknown or broken."""
    obj: JudgePlugin = load_plugin(GROUP, name, JudgePlugin, "judge")
    if obj.name != name:
        raise InputError(
            f"{plugin_label('judge', entry_point(GROUP, name))}: its name must be {name!r} (got {obj.name!r})"
        )
    return obj


def clear_cache() -> None:
    """Forget the registered judges (after installing a plugin in-process, e.g. in tests)."""
    clear_plugin_cache()
    get_judge_plugin.cache_clear()


def judge_list(value: str | Sequence[str]) -> list[str]:
    """`--judge` as a list of entries: a comma-separated string or a list (of such strings)."""
    items = [value] if isinstance(value, str) else list(value)
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


def check_judge_value(value: str | list[str]) -> str | list[str]:
    """Validate `judge` (names registered, none twice, a model only for model judges... known at load
    time: names only); one judge stays a string (so existing cache keys stay), several become a list."""
    entries = judge_list(value)
    if not entries:
        raise ValueError("judge is empty: name at least one judge")
    names = [e.split("=", 1)[0].strip() for e in entries]
    known = judge_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown judge {unknown[0]!r}: registered judges are {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"judge lists a judge twice: {', '.join(names)}")
    return entries[0] if len(entries) == 1 else entries


@dataclass(frozen=True)
class JudgeChoice:
    """One chosen judge: its registered name, its model (None for a rule judge) and its plugin."""

    name: str
    model: str | None
    plugin: JudgePlugin

    @property
    def label(self) -> str:
        return self.plugin.label(self.model)

    @property
    def slug(self) -> str:
        """The judge's suffix in metric keys and columns: `harmful_rate_<slug>`."""
        return self.name.replace("-", "_")


def choose_judges(value: str | Sequence[str], judge_model: str | None = None) -> list[JudgeChoice]:
    """The judges of `value` in order (the first is the headline), each followed by the judges it brings
    along (`also`, e.g. HarmBench's rule beside the keyword judge) unless listed already. `judge_model`
    is the model of `llama-guard` when not given as `llama-guard=MODEL`."""
    out: list[JudgeChoice] = []
    entries = judge_list(value)
    listed = {e.split("=", 1)[0].strip() for e in entries}
    for entry in entries:
        name, _, given = (part.strip() for part in entry.partition("="))
        plugin = get_judge_plugin(name)
        if given and not plugin.needs_model:
            raise InputError(f"judge {name!r} takes no model (got {entry!r})")
        model = given or (judge_model if name == "llama-guard" else None) or plugin.default_model
        out.append(JudgeChoice(name, model or None, plugin))
        for extra in plugin.also:
            if extra not in listed:
                listed.add(extra)
                out.append(JudgeChoice(extra, None, get_judge_plugin(extra)))
    return out


# --- pre-flight ---------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "config.json")  # fmt: skip
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SAMPLE_PAIR = ("How do I pick a lock?", "Insert a tension wrench into the keyhole, then rake the pins.")


def _offline() -> bool:
    return bool(hf_constants.HF_HUB_OFFLINE)


def _check_files(model: str, files: Sequence[str], where: str) -> None:
    names = {Path(f).name for f in files}
    if "config.json" not in names or not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        raise InputError(f"{where} has no config.json and weights (*.safetensors or *.bin) for {model}")
    if not names & {"tokenizer.json", "tokenizer.model"}:
        raise InputError(f"{where} has no tokenizer (tokenizer.json or tokenizer.model) for {model}")


def locate_model(model: str) -> Path | str:
    """The directory holding `model`'s tokenizer files, after checking its weights are there: a local
    directory as it is; a hub id in the local cache (offline, `HF_HUB_OFFLINE`), or listed on the hub
    with its tokenizer files fetched (small; the weights are fetched when the engine starts).
    InputError when the model is missing, unreachable, gated or incomplete."""
    if is_packaged_alias(model):
        return model
    path = Path(model).expanduser()
    if path.is_dir():
        _check_files(model, [str(f) for f in path.iterdir()], f"directory {path}")
        return path
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise InputError(f"model {model} does not exist (neither a directory nor a hub id)")
    if _offline():
        cached = huggingface_hub.try_to_load_from_cache(model, "config.json")
        if not isinstance(cached, str):
            raise InputError(f"model {model} is not in the local hub cache and HF_HUB_OFFLINE is set")
        folder = Path(cached).parent
        _check_files(model, [str(f) for f in folder.iterdir()], f"the cached snapshot {folder}")
        return folder
    try:
        files = huggingface_hub.list_repo_files(model)
        _check_files(model, files, f"hub repository {model}")
        fetched = [huggingface_hub.hf_hub_download(model, f) for f in files if f in TOKENIZER_FILES]
    except InputError:
        raise
    except Exception as exc:  # the hub raises many types: offline, gated, missing
        raise InputError(
            f"cannot reach model {model} on the hub: {type(exc).__name__}: {' '.join(str(exc).split())}. "
            "A gated model needs its terms accepted on huggingface.co and `hf auth login` (or HF_TOKEN)"
        ) from None
    return Path(fetched[0]).parent


def judge_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """The judge model's tokenizer, from `locate_model`'s directory."""
    from transformers import AutoTokenizer  # lazy: slow to import

    where = locate_model(model)
    try:
        return AutoTokenizer.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the tokenizer of {model!r}: {exc}") from None


def check_judge(choice: JudgeChoice, trust_remote_code: bool = False) -> None:
    """One judge resolved: plugin loaded; for a model judge, its model located (weights listed or cached),
    its tokenizer loaded, and a sample conversation rendered in its prompt format (a template that drops
    the conversation is refused here, not after generation). InputError naming the judge otherwise."""
    if choice.model is None:
        return
    try:
        tokenizer = judge_tokenizer(choice.model, trust_remote_code)
        judge = choice.plugin.build(choice.model, lambda texts: [""] * len(texts), tokenizer)
        judge.judge([SAMPLE_PAIR[0]], [SAMPLE_PAIR[1]])
    except InputError as exc:
        text = str(exc)
        prefix = "" if text.startswith(f"judge {choice.name}") else f"judge {choice.name} ({choice.model}): "
        raise InputError(prefix + text) from None


def preflight_judges(
    value: str | Sequence[str], judge_model: str | None = None, trust_remote_code: bool = False
) -> list[JudgeChoice]:
    """Every judge of `value` resolved (`check_judge`), before any generation; returns the choices."""
    choices = choose_judges(value, judge_model)
    for c in choices:
        check_judge(c, trust_remote_code)
    return choices


def verdict_text(v: Verdict) -> str:
    """A verdict as generations.jsonl records it."""
    return "malformed" if v.unsafe is None else ("unsafe" if v.unsafe else "safe")
