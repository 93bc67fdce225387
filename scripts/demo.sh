#!/usr/bin/env bash
# The main job on a fresh machine: set up, then train LoRA and NoRA+ side by side → evaluate both and the base
# on held-out items → sample → merge --verify, on the embedded SmolLM2-135M and nora's own "even or odd?"
# demo task (recipes/smollm2-135m-demo.yaml). Everything stays offline; outputs go to out/demo*.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
OUT="${NORA_DEMO_OUT:-out/demo}"  # NORA_DEMO_TRAIN_ARGS="--set train.max_steps=5" for a smoke run

echo "== 1/3 base vs LoRA vs NoRA+: same data, same seed; scored on 200 held-out numbers (log-likelihood)"
# shellcheck disable=SC2086  # NORA_DEMO_TRAIN_ARGS is a list of flags
nora sweep smollm2-135m-demo --methods base,lora,nora+ --seeds 0 --output-dir "$OUT" ${NORA_DEMO_TRAIN_ARGS:-}
echo "== 2/3 sample from the NoRA+ adapter: 4059 is a held-out number, 25736 has more digits than any trained one"
nora sample --adapter "$OUT/nora+/seed0" --max-new-tokens 8 \
  --prompt $'Please answer the following question with even or odd: is the number 4059 even or odd?\n\nAnswer format: even/odd' \
  --prompt $'Please answer the following question with even or odd: is the number 25736 even or odd?\n\nAnswer format: even/odd'
echo "== 3/3 merge NoRA+ into a standalone model and verify it against base + adapter"
nora merge --adapter "$OUT/nora+/seed0" --out "$OUT-merged" --verify --overwrite
python - "$OUT/table.json" <<'PY'
import json, sys
table = json.loads(open(sys.argv[1]).read())
acc = {m: r["0"]["accuracy"]["demo"] for m, r in table["runs"].items()}
print("held-out accuracy (even or odd?, 200 numbers not in training): "
      + "  ".join(f"{m} {a:.1%}" for m, a in acc.items()))
print(f"loss curves of both methods: {sys.argv[1].rsplit('/', 1)[0]}/loss_curves.png")
PY
