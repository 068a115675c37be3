#!/usr/bin/env bash
# GPU checks, for a development session that is lent a GPU machine (never run by CI).
# Run from the repository root on that machine, with pinned wheels in .whl/ (Python 3.12 builds of
# pydantic, pydantic-core, typing-inspection, annotated-types, transformers, tokenizers, peft, trl,
# datasets, dill, multiprocess, huggingface_hub, safetensors; see docs/benchmarks.md).
# It runs the GPU tests (engine on CUDA, train → eval on CUDA with bf16), the per-module criterion
# benchmark on the GPU, and a whole scan of a 7B-shaped synthetic pair on cuda and on cpu.
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.whl/extra:$PWD/src:$PWD/tests HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'cuda', torch.cuda.is_available())"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_train_eval_e2e.py 2>&1 | tee "$OUT/pytest.log" | tail -15
timeout 120 python3 benchmarks/bench_criterion_device.py --device cuda --json "$OUT/criterion_cuda.json"
timeout 120 python3 benchmarks/synthetic.py --preset llama2-7b --out /tmp/syn7b > /dev/null
for dev in cuda cpu; do
  TIMEFORMAT="$dev: scan of 64 modules (7B shapes, warm page cache), whole command: %R s"
  time timeout 200 python3 -m safemerge scan -a /tmp/syn7b/aligned -u /tmp/syn7b/unaligned \
    -t /tmp/syn7b/task_adapter --device "$dev" --out "$OUT/scan-$dev" --no-plot --quiet
done
python3 - "$OUT" <<'EOF'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/scan-{d}/safemerge_report.json"))["modules"] for d in ("cuda", "cpu"))
print("scan cuda vs cpu: max |Δρ| =", max(abs(x["rho"] - y["rho"]) for x, y in zip(a, b)),
      "; same selection:", [x["selected"] for x in a] == [y["selected"] for y in b])
EOF
