#!/usr/bin/env bash
# The main job on a fresh machine: set up, then train → evaluate (before/after) → sample → merge --verify
# on the embedded SmolLM2-135M demo. Everything stays offline; outputs go to out/demo*.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
OUT="${NORA_DEMO_OUT:-out/demo}"  # NORA_DEMO_TRAIN_ARGS="--set train.max_steps=5" for a smoke run

echo "== 1/5 evaluate the base model on the demo task (log-likelihood of each answer option)"
nora evaluate --model smollm2-135m --task demo --protocol loglikelihood --limit 60 --output "$OUT-eval/base/results.json"
echo "== 2/5 train a NoRA+ adapter (recipes/smollm2-135m-demo.yaml)"
nora train smollm2-135m-demo --output-dir "$OUT" --overwrite ${NORA_DEMO_TRAIN_ARGS:-}
echo "== 3/5 evaluate base + adapter"
nora evaluate --adapter "$OUT" --task demo --protocol loglikelihood --limit 60 --output "$OUT-eval/adapter/results.json"
echo "== 4/5 sample a few answers"
nora sample --adapter "$OUT" --max-new-tokens 24 \
  --prompt $'Please choose the correct answer to the question: What is 17 + 25?\n\nAnswer1: 41 Answer2: 42 Answer3: 52\n\nAnswer format: answer1/answer2/answer3' \
  --prompt $'Please choose the correct answer to the question: Which number is the largest?\n\nAnswer1: 12 Answer2: 87 Answer3: 45 Answer4: 9\n\nAnswer format: answer1/answer2/answer3/answer4'
echo "== 5/5 merge into a standalone model and verify it against base + adapter"
nora merge --adapter "$OUT" --out "$OUT-merged" --verify --overwrite
python - "$OUT-eval" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
before, after = (json.loads((d / f / "results.json").read_text())["tasks"]["demo"]["accuracy"] for f in ("base", "adapter"))
print(f"demo accuracy: base {before:.1%} -> NoRA+ adapter {after:.1%}")
PY
