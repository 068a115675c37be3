#!/usr/bin/env bash
# Mutation testing with mutmut 3 (configured in pyproject.toml, [tool.mutmut]); NOT part of .ci/run.
#
#   bash scripts/mutation.sh                                  # every configured module (hours on 2 cores)
#   bash scripts/mutation.sh "safemerge.engine.criterion*"    # a subset: mutant-name globs
#   bash scripts/mutation.sh "safemerge.engine.criterion*" "safemerge.common.stats*"
#
# mutmut copies src/ and tests/ into mutants/ (git-ignored), mutates the modules listed in only_mutate,
# runs the fast test files of pytest_add_cli_args_test_selection against each mutant (only the tests
# that cover the mutated function) and keeps its results in mutants/, so a rerun only redoes what
# changed. The summary is printed at the end; `mutmut show NAME` prints one mutant's diff.
# Record the numbers and every survivor (a killing test, or why it is equivalent) in docs/testing.md.
# mutmut maps a test to the functions it calls when it first sees the test: after code moved into a
# new function (or a file was added to only_mutate), `mv mutants/mutmut-stats.json /tmp/` first, so
# the mapping is re-collected (cached results are kept); see docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# One torch thread per worker; mutmut runs one worker per core.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
.venv/bin/mutmut run "$@" || true   # a non-zero exit here means survivors, which the summary lists
echo "== mutmut results: survivors, timeouts, suspicious (killed mutants are not listed) =="
.venv/bin/mutmut results | grep -v ": not checked$" || true
echo "(not checked, i.e. outside the globs given: $(.venv/bin/mutmut results | grep -c ": not checked$" || true))"
