#!/usr/bin/env bash
# The whole pipeline offline on the built-in demo set, on the CPU, in a few minutes:
#   bash scripts/demo.sh
# convert (--demo) -> pretrain -> SFT -> evaluation with baselines, using a small language
# model and the random-tiny vision tower. Writes dataset/demo/ and out/demo/ (your real
# dataset/ and out/ files are left alone). Set DEMO_EPOCHS to train longer.
#   DEMO=hard bash scripts/demo.sh    # the hard set (priors useless, 4 + 32 epochs): dataset/demo_hard/, out/demo_hard/
# Learning rates are the automatic ones for a language model trained from scratch (1e-3 in both stages).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
KIND=${DEMO:-easy}
SUFFIX=$([ "$KIND" = hard ] && echo _hard || true)
DATA=dataset/demo$SUFFIX
OUT=out/demo$SUFFIX
# Stage-2 recipe per set, measured with scripts/sweep_hard.sh (docs/learning.md): 32 (hard) / 8 (easy)
# epochs at a constant learning rate after the warm-up, questions packed per image. The easy set took 16
# before it had boxes and verification questions; with them its validation exact match reached 100 % at
# epoch 7 of 16 (2026-12-03), so 8 keep the quick start short. Without grounding the hard
# set's kind x side x organ questions were learned late (epochs 12-22, seed-dependent); with it, early.
# The hard set has organ/finding boxes: stage 1 learns its box questions at its default 4 epochs and both
# stages train where to look (--look_loss, on by default); the easy set has no boxes. Both recipes were
# measured at a stage-2 peak rate of 1e-3 (the guide's 4 + 4 epochs default to 5e-4 since Learning III) and
# without --look_contrast (on by default since; measured at the guide's 4 + 4 epochs only).
GROUND=(--look_contrast none)
if [ "$KIND" = hard ]; then
  PRE_EPOCHS=4; EPOCHS=${DEMO_EPOCHS:-32}; SFT=(--batch_size 4 --pack_questions 8 --lr_schedule constant --learning_rate 1e-3)
  CHECK=(--margin 0.15 --open_margin 0.30)  # issue #13's bar: +15 points on closed, +30 on open questions
else
  PRE_EPOCHS=2; EPOCHS=${DEMO_EPOCHS:-8}; SFT=(--batch_size 8 --pack_questions 4 --lr_schedule constant --learning_rate 1e-3)
  CHECK=(--margin 0.20)  # measured: closed +39.1, open +52.3 at 1 and at 2 threads (identical runs, 2026-12-03)
fi
MODEL=(--vision_model random-tiny --hidden_size 128 --num_hidden_layers 2 --num_attention_heads 4
       --num_key_value_heads 2 --images_path "$DATA/medical_images" --out_dir "$OUT" --cache_dir "$DATA/cache")
# A rerun continues a stopped demo: each stage saves a resume state every 50 steps and resumes from it
# (a stage that had finished is not repeated). A changed DEMO_EPOCHS starts stage 2 afresh.
resume() {  # $1 = run name; prints --resume when that run left a resume state of the same length
  local state="$OUT/$1_resume.pth"
  [ -f "$state" ] && [ "$(cat "$OUT/.$1.epochs" 2>/dev/null)" = "$2" ] && echo --resume || true
}
start=$(date +%s)
echo "== 1/4 build the synthetic mini-SLAKE"
$PY convert_slake_dataset.py --demo "$KIND" --out_dir "$DATA"   # idempotent: unchanged images are not rewritten
echo "== 2/4 stage 1: align image features (captions, box and verification questions, the training questions)"
mkdir -p "$OUT"
R=$(resume medical_pretrain_vlm_128 "$PRE_EPOCHS"); echo "$PRE_EPOCHS" > "$OUT/.medical_pretrain_vlm_128.epochs"
$PY train_pretrain_vlm.py "${MODEL[@]}" --data_path "$DATA/medical_pretrain.jsonl" --epochs "$PRE_EPOCHS" --batch_size 16 \
  "${GROUND[@]}" --log_interval 10 --save_interval 50 $R
echo "== 3/4 stage 2: medical question answering"
R=$(resume medical_vlm_128 "$EPOCHS"); echo "$EPOCHS" > "$OUT/.medical_vlm_128.epochs"
$PY train_sft_vlm.py "${MODEL[@]}" --data_path "$DATA/medical_vqa_train.jsonl" \
  --val_path "$DATA/medical_vqa_validation.jsonl" --epochs "$EPOCHS" "${SFT[@]}" "${GROUND[@]}" --log_interval 10 \
  --save_interval 50 $R
echo "== 4/4 evaluation on the demo test split"
$PY eval_vlm.py --model_path "$OUT/medical_vlm_128.pth" --data_path "$DATA/medical_vqa_test.jsonl" \
  --train_path "$DATA/medical_vqa_train.jsonl" --images_path "$DATA/medical_images" --out_dir "$OUT" \
  --cache_dir "$DATA/cache"
if ! $PY -m scripts.check_learning "$OUT/eval/medical_vlm_128/metrics.json" "${CHECK[@]}"; then
  echo "The model did not clearly beat answering from the question text. Try: DEMO_EPOCHS=$(( EPOCHS * 2 )) bash" \
       "scripts/demo.sh (longer stage 2), or rm -r $OUT to start over; the table above and"
  echo "$OUT/medical_vlm_128_loss.png show where it stands (README: Troubleshooting)."
  exit 1
fi
echo "done in $(( $(date +%s) - start )) s. Loss curves: $OUT/*_loss.png; the model against the priors:" \
     "$OUT/eval/medical_vlm_128/baselines.png"
echo "Try it in the browser:  .venv/bin/python web_demo_vlm.py --model_path $OUT/medical_vlm_128.pth"
