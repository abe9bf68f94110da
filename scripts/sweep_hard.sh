#!/usr/bin/env bash
# Stage-2 recipe sweep on the hard synthetic set (priors useless), CPU-sized model.
#   DEMO=hard bash scripts/demo.sh        # once: data, stage 1 and the baseline recipe
#   bash scripts/sweep_hard.sh [NAME ...] # each variant: SFT from the same stage-1 model, then eval
# Prints one line per variant and writes out/sweep_hard/<name>/eval/medical_vlm_128/metrics.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=dataset/demo_hard
PRE=out/demo_hard/medical_pretrain_vlm_128.pth
[ -f "$PRE" ] || { echo "run DEMO=hard bash scripts/demo.sh first"; exit 1; }
declare -A V=(
  [base]="--learning_rate 2e-3"
  [lr1e-3]="--learning_rate 1e-3"
  [lr4e-3]="--learning_rate 4e-3"
  [vision_last1]="--learning_rate 2e-3 --train_vision last:1 --vision_lr 1e-3"
  [vision_all]="--learning_rate 2e-3 --train_vision all --vision_lr 1e-3"
  [vision_all_lr3e-4]="--learning_rate 2e-3 --train_vision all --vision_lr 3e-4"
  [balance]="--learning_rate 2e-3 --balance_closed"
  [epochs32]="--learning_rate 2e-3 --epochs 32"
)
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(base vision_last1 vision_all lr1e-3 balance)
for name in "${NAMES[@]}"; do
  out=out/sweep_hard/$name
  start=$(date +%s)
  # shellcheck disable=SC2086
  $PY train_sft_vlm.py --vision_model random-tiny --hidden_size 128 --num_hidden_layers 2 --num_attention_heads 4 \
    --num_key_value_heads 2 --images_path "$DATA/medical_images" --out_dir "$out" --cache_dir "$DATA/cache" \
    --data_path "$DATA/medical_vqa_train.jsonl" --val_path "$DATA/medical_vqa_validation.jsonl" --epochs 16 \
    --batch_size 8 --pack_questions 4 --log_interval 100 --from_weight "$PRE" ${V[$name]} > "$out.log" 2>&1 || true
  $PY eval_vlm.py --model_path "$out/medical_vlm_128.pth" --data_path "$DATA/medical_vqa_test.jsonl" \
    --train_path "$DATA/medical_vqa_train.jsonl" --images_path "$DATA/medical_images" --out_dir "$out" \
    --cache_dir "$DATA/cache" --constrain closed >> "$out.log" 2>&1 || true
  $PY - "$name" "$out/eval/medical_vlm_128/metrics.json" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
name, path, secs = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    m = json.load(open(path))
except OSError:
    print(f"{name:20s} FAILED (see {path.split('/eval')[0]}.log)"); sys.exit()
b = m["baselines"]["majority_per_question"]; u = m["image_use"]; c = m.get("constrained", {})
f = lambda x: "-" if x is None else f"{100 * x:.1f}"
print(f"{name:20s} closed {f(m['closed_accuracy'])} (prior {f(b['closed_accuracy'])}, constrained "
      f"{f(c.get('closed_accuracy'))}) open {f(m['open_accuracy'])} (prior {f(b['open_accuracy'])}) | against prior: "
      f"closed {f(u['closed']['against_prior_accuracy'])} open {f(u['open']['against_prior_accuracy'])} | {secs} s")
PY
done
