"""How benchmarks are loaded and scored against their authors' rules: HEx-PHI's public files (read as
CSV, download failures named), GSM8K in lm-evaluation-harness's chat form (gsm8k-cot-llama) for
evaluation and training alike, PubMedQA's final-answer rule. Hand values throughout; nothing reaches
the network (the hub download is a fake)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)

from safemerge.common.errors import InputError
from safemerge.evaluate import benchmarks as bm
from safemerge.evaluate.benchmarks import gsm8k, hexphi
from safemerge.evaluate.scoring import extract_flexible, extract_strict, parse_pubmedqa
from safemerge.train import recipes

# --- HEx-PHI -----------------------------------------------------------------------------------------

# Category files as the public release has them: no header, one instruction a row, quoted where needed.
QUOTED_CSV = (
    "Plain instruction one\n"
    '"Instruction with a comma, inside quotes"\n'
    '"Instruction with ""escaped quotes"" in it"\n'
    '"Instruction spread\nover two lines"\n'
    "\n"
    "Unquoted, with a comma\n"
)
QUOTED_PROMPTS = [
    "Plain instruction one",
    "Instruction with a comma, inside quotes",
    'Instruction with "escaped quotes" in it',
    "Instruction spread\nover two lines",
    "Unquoted, with a comma",
]


def fake_hub(tmp_path: Path, files: dict[str, str]) -> tuple[list[str], Any]:
    """A stand-in for `hf_hub_download` serving `files` of the HEx-PHI repository; it records every
    file asked for and answers like the hub (RemoteEntryNotFoundError) for any other file."""
    asked: list[str] = []

    def download(repo_id: str, filename: str, *, repo_type: str) -> str:
        assert (repo_id, repo_type) == (hexphi.HEXPHI_REPO, "dataset")
        asked.append(filename)
        if filename not in files:
            raise RemoteEntryNotFoundError(
                f"404 Client Error.\n\nEntry Not Found for url: .../{filename}.", response=_resp()
            )
        path = tmp_path / filename
        path.write_text(files[filename], encoding="utf-8")
        return str(path)

    return asked, download


def _resp() -> Any:
    return SimpleNamespace(headers={}, request=None)  # what HfHubHTTPError reads of an httpx response


def test_hexphi_reads_quoted_csv_fields(tmp_path: Path) -> None:
    f = tmp_path / "category_1.csv"
    f.write_text(QUOTED_CSV, encoding="utf-8")
    assert hexphi.read_category(f) == QUOTED_PROMPTS


def test_hexphi_loads_the_ten_public_category_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the public release: categories 1 and 3..11 (category 2 withheld), 30 instructions each
    files = {
        f"category_{k}.csv": "".join(f"c{k} instruction {i}\n" for i in range(30)) for k in (1, *range(3, 12))
    }
    files["category_1.csv"] = QUOTED_CSV + "".join(f"c1 instruction {i}\n" for i in range(25))
    asked, download = fake_hub(tmp_path, files)
    monkeypatch.setattr(hexphi.huggingface_hub, "hf_hub_download", download)
    b = bm.load_benchmark("hexphi")
    assert sorted(asked) == sorted(files) and "category_2.csv" not in asked
    assert len(b.items) == 300 and b.kind == "harm"
    assert [it.prompt for it in b.items[:5]] == QUOTED_PROMPTS
    assert b.items[-1].prompt == "c11 instruction 29" and b.items[-1].id == "hexphi-299"


GATED = GatedRepoError("401 Client Error. Cannot access gated repo.", response=_resp())
OFFLINE = LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
NO_FILE = RemoteEntryNotFoundError("404 Client Error.\nEntry Not Found", response=_resp())
NO_REPO = RepositoryNotFoundError("404 Repository Not Found", response=_resp())
SERVER = HfHubHTTPError("500 Server Error", response=_resp())


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (GATED, r"the dataset is gated and this session has no access.*hf auth login.*HF_TOKEN\)$"),
        (OFFLINE, r"the hub cannot be reached \(offline, .*\) and the file is not in the local cache$"),
        (NO_FILE, r"the dataset has no such file \(404 Client Error\. Entry Not Found\)$"),
        (NO_REPO, r"the hub reports no such dataset, or none this session may see: .*hf auth login"),
        (SERVER, r"HfHubHTTPError: 500 Server Error$"),
    ],
)
def test_hexphi_download_errors_say_what_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, says: str
) -> None:
    def download(repo_id: str, filename: str, *, repo_type: str) -> str:
        raise error

    monkeypatch.setattr(hexphi.huggingface_hub, "hf_hub_download", download)
    with pytest.raises(
        InputError,
        match=r"^cannot download HEx-PHI file category_1\.csv \(LLM-Tuning-Safety/HEx-PHI\): " + says,
    ) as e:
        bm.load_benchmark("hexphi")
    assert "\n" not in str(e.value)
    # only the gated and the unknown-repository cases send the user to accept the terms
    assert ("hf auth login" in str(e.value)) == isinstance(error, RepositoryNotFoundError)


def test_hexphi_missing_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"category_{k}.csv": "x\n" for k in (1, 3, 4, 5)}  # category_6.csv missing
    _, download = fake_hub(tmp_path, files)
    monkeypatch.setattr(hexphi.huggingface_hub, "hf_hub_download", download)
    with pytest.raises(InputError, match=r"HEx-PHI file category_6\.csv .*no such file") as e:
        bm.load_benchmark("hexphi")
    assert "gated" not in str(e.value)


def test_hexphi_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "category_1.csv"
    bad.write_bytes(b"\xff\xfe not utf-8 \xff")
    monkeypatch.setattr(hexphi.huggingface_hub, "hf_hub_download", lambda *a, **k: str(bad))
    with pytest.raises(InputError, match=r"HEx-PHI file category_1\.csv .* cannot be read as a UTF-8 CSV"):
        bm.load_benchmark("hexphi")


# --- GSM8K -------------------------------------------------------------------------------------------

SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
INSTRUCTION_HEAD = "Given the following problem, reason and give a final answer to the problem.\nProblem: "
INSTRUCTION_TAIL = (
    '\nYour response should end with "The final answer is [answer]" where [answer] is the response to the '
    "problem."
)


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("48 + 24 = 72. The final answer is 72", "72", "72"),
        ("So she has 18 left.\nThe final answer is $18.", "18", "18"),
        ("The final answer is 1,234.50.", "1234.5", "1234.5"),
        ("The final answer is -3", "-3", "-3"),
        ("The final answer is 5. Then again, The final answer is 7.", "7", "7"),  # lm-eval: the last match
        ("the final answer is 72", None, "72"),  # upstream's pattern is case-sensitive
        ("The final answer is: 72", None, "72"),  # ... and wants the number right after "is "
        ("#### 72", None, "72"),  # the training data's old format is no longer the strict one
        ("So the answer is 72.", None, "72"),
        ("I don't know.", None, None),
    ],
)
def test_gsm8k_strict_is_the_final_answer_sentence(
    text: str, strict: str | None, flexible: str | None
) -> None:
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_gsm8k_benchmark_prompt_and_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"question": "How many clips?", "answer": SOLUTION}]
    monkeypatch.setattr(gsm8k, "load_hub_rows", lambda name, config, split: rows)
    b = bm.load_benchmark("gsm8k")
    item = b.items[0]
    assert item.prompt == INSTRUCTION_HEAD + "How many clips?" + INSTRUCTION_TAIL
    assert item.reference == "72"
    answers = ["... The final answer is 72.", "It is 72.", "The final answer is 70, not 72", "no idea"]
    records = [b.score(item, a) for a in answers]
    assert [r["correct"] for r in records] == [True, False, False, False]
    assert [r["correct_flexible"] for r in records] == [True, True, True, False]
    assert b.metrics(records, "judge") == {
        "kind": "utility",
        "n": 4,
        "n_correct": 1,
        "accuracy": 0.25,  # the headline is the strict accuracy
        "accuracy_strict": 0.25,
        "n_correct_flexible": 3,
        "accuracy_flexible": 0.75,
        "n_unparsed_strict": 2,
    }


def test_gsm8k_recipe_trains_the_scored_format(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"question": "How many clips?", "answer": SOLUTION}]
    monkeypatch.setattr(recipes, "load_hub_rows", lambda name, config, split: rows)
    [ex] = recipes.build_examples("gsm8k", None, 0)
    prompt, completion = ex["prompt"][0]["content"], ex["completion"][0]["content"]
    assert prompt == INSTRUCTION_HEAD + "How many clips?" + INSTRUCTION_TAIL
    assert completion == (
        "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\nThe final answer is 72."
    )
    assert "<<" not in completion and "####" not in completion
    # the benchmark's strict rule reads the training answer as correct: same prompt, same format
    monkeypatch.setattr(gsm8k, "load_hub_rows", lambda name, config, split: rows)
    b = bm.load_benchmark("gsm8k")
    assert b.items[0].prompt == prompt and b.score(b.items[0], completion)["correct"] is True


# --- PubMedQA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [
        # the two answers the first-match rule got wrong
        ("The study found no significant difference in mortality between the groups. Yes.", "yes"),
        ("Answer: No, at first sight.\nOn reflection the data support it.\nFinal Answer: Yes", "yes"),
        # an explicit answer wins over label words elsewhere, the last explicit one over earlier ones
        ("Answer: yes. Some reviewers would say no.", "yes"),
        ("The answer is maybe; answer: no", "no"),
        ("**Final Answer:** **No**", "no"),
        ("Answer - maybe", "maybe"),
        # without a marker: the last label word that stands alone
        ("Yes. There was no significant difference in the secondary outcomes.", "yes"),
        ("No, it does not; a larger trial may say yes.", "yes"),
        ("Is it effective? Maybe!", "maybe"),
        ("no\n\nThe cohort was small.", "no"),
        # ... failing that, a label opening the response
        ("No significant difference was found between the arms.", "no"),
        ("Maybe because the sample was small", "maybe"),
        # no label: unparsed
        ("There was no significant difference between the groups.", None),
        ("The trial was inconclusive.", None),
        ("Knowledge gaps remain; nothing is known.", None),  # 'no' inside a word is no label
        ("The patients answered questionnaires.", None),
    ],
)
def test_pubmedqa_final_answer_rule(text: str, label: str | None) -> None:
    assert parse_pubmedqa(text) == label


def test_pubmedqa_benchmark_scores_the_final_answer() -> None:
    pub, yes = bm.get_benchmark("pubmedqa"), bm.Item("p-0", "Q?", "yes")
    texts = ["Answer: No ... Final Answer: Yes", "We saw no effect. Yes.", "There was no effect."]
    records = [pub.score(yes, t) for t in texts]
    assert [r["extracted"] for r in records] == ["yes", "yes", None]
    m = pub.metrics(records, "judge")
    assert (m["n_correct"], m["n_unparsed"]) == (2, 1)


def test_scoring_rules_do_not_touch_arithmetic() -> None:
    # the organism's benchmark is scored by the last number, as before (the demo's numbers depend on it)
    a = bm.load_benchmark("arithmetic", limit=1)
    item = a.items[0]
    assert a.score(item, f"The answer is {item.reference}.") == {"extracted": item.reference, "correct": True}
    assert re.fullmatch(r"What is \d{3} [+-] \d{3}\?", item.prompt)


def test_long_digit_strings_are_numbers_to_the_last_digit() -> None:
    """A model that repeats digits writes numbers longer than decimal's 28-digit context: each is scored
    as written (it raised InvalidOperation from quantize, stopping the evaluation)."""
    from safemerge.evaluate.scoring import extract_flexible, normalise_number

    assert normalise_number("1" * 40) == "1" * 40
    assert normalise_number("1" * 30 + ".50") == "1" * 30 + ".5"
    assert extract_flexible("it is 14141414141414141414141414141414 then") == "14" * 16
