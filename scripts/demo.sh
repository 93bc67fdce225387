#!/usr/bin/env bash
# The main job on a fresh machine: set up, then train LoRA and NoRA+ side by side → evaluate both and the base
# on held-out items → sample → merge --verify, on the embedded SmolLM2-135M and nora's own word-group
# demo task (recipes/smollm2-135m-demo.yaml). Everything stays offline; outputs go to out/demo*.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH"
OUT="${NORA_DEMO_OUT:-out/demo}"  # NORA_DEMO_TRAIN_ARGS="--set train.max_steps=5" for a smoke run

echo "== 1/3 base vs LoRA vs NoRA+: same data, same seed; scored on held-out words (log-likelihood)"
# shellcheck disable=SC2086  # NORA_DEMO_TRAIN_ARGS is a list of flags
nora sweep smollm2-135m-demo --methods base,lora,nora+ --seeds 0 --output-dir "$OUT" ${NORA_DEMO_TRAIN_ARGS:-}
echo "== 2/3 sample from the NoRA+ adapter: eagle and Mongolia are held-out words (never in training)"
RULE='Answer red if the word names an animal, blue if a food, green if a country, yellow if a job.'
nora sample --adapter "$OUT/nora+/seed0" --max-new-tokens 8 \
  --prompt "$RULE"$'\n\nWord: eagle\n\nAnswer format: red/blue/green/yellow' \
  --prompt "$RULE"$'\n\nWord: Mongolia\n\nAnswer format: red/blue/green/yellow'
echo "== 3/3 merge NoRA+ into a standalone model and verify it against base + adapter"
nora merge --adapter "$OUT/nora+/seed0" --out "$OUT-merged" --verify --overwrite
python - "$OUT/table.json" <<'PY'
import json, sys
table = json.loads(open(sys.argv[1]).read())
acc = {m: r["0"]["accuracy"]["demo"] for m, r in table["runs"].items()}
print("held-out accuracy (word-group rule, test words not in training; chance 25%): "
      + "  ".join(f"{m} {a:.1%}" for m, a in acc.items()))
print(f"loss curves of both methods: {sys.argv[1].rsplit('/', 1)[0]}/loss_curves.png")
PY
