#!/usr/bin/env bash
# Recipe sweep on the hard synthetic set (priors useless), CPU-sized model (128 wide, random-tiny tower):
#   bash scripts/sweep_hard.sh                    # the default list below
#   bash scripts/sweep_hard.sh guide demo32 ...   # chosen variants
#   JOBS=2 bash scripts/sweep_hard.sh ...         # two variants at a time, one thread each
#   DATA=dataset/demo_easy-prior_vb TAG=prior bash scripts/sweep_hard.sh guide guide_seed1   # another converted set
#     (e.g. convert_slake_dataset.py --demo easy-prior --out_dir dataset/demo_easy-prior_vb); results in out/sweep_hard_TAG/
# Each variant runs stage 1, stage 2 and the evaluation from scratch (or from the stand-in MiniMind2
# weights of scripts/make_standin_llm.py for the llm_* variants) and prints one line; results are
# appended to out/sweep_hard/results.txt, runs are in out/sweep_hard/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-dataset/demo_hard}      # another converted set (its images under $IMAGES)
IMAGES=${IMAGES:-$DATA/medical_images}
SWEEP=out/sweep_hard${TAG:+_$TAG}
LLM=$SWEEP/standin_llm_128x${LAYERS:-2}.pth
mkdir -p "$SWEEP"
# the default set is (re)converted every time (idempotent), so it always has today's contract (boxes, box questions)
[ "$DATA" != dataset/demo_hard ] || $PY convert_slake_dataset.py --demo hard --out_dir "$DATA" > /dev/null
DEMO_PRE="--epochs 2 --batch_size 16"
# name = "start | stage-1 flags | stage-2 flags"; start: scratch, or llm (--from_llm, the stand-in weights).
# Rows measured before --lr_schedule auto (wsd for stage 2 from scratch) name the schedule they ran with.
declare -A V=(
  [guide]="scratch | | "                                            # the guide's commands, default flags
  [guide_cosine]="scratch | | --lr_schedule cosine"                 # ... with the stage-2 schedule before auto
  [guide_constant]="scratch | | --lr_schedule constant"
  [guide_lr1e-4]="scratch | --learning_rate 4e-4 | --learning_rate 1e-4 --lr_schedule cosine"   # the defaults before the sweep
  [demo16]="scratch | $DEMO_PRE | --epochs 16 --batch_size 8 --pack_questions 4 --lr_schedule cosine"
  [demo32]="scratch | $DEMO_PRE | --epochs 32 --batch_size 8 --pack_questions 4 --lr_schedule cosine"
  [demo32_lr2e-3]="scratch | $DEMO_PRE | --epochs 32 --batch_size 8 --pack_questions 4 --learning_rate 2e-3 --lr_schedule cosine"
  [demo16_wd0.1]="scratch | $DEMO_PRE | --epochs 16 --batch_size 8 --pack_questions 4 --weight_decay 0.1 --lr_schedule cosine"
  [demo32_pack8]="scratch | $DEMO_PRE | --epochs 32 --batch_size 4 --pack_questions 8 --lr_schedule cosine"
  [demo32_pack8_seed1]="scratch | $DEMO_PRE --seed 1 | --epochs 32 --batch_size 4 --pack_questions 8 --seed 1 --lr_schedule cosine"
  [demo32_pack8_lr2e-3_seed1]="scratch | $DEMO_PRE --seed 1 | --epochs 32 --batch_size 4 --pack_questions 8 --seed 1 --learning_rate 2e-3 --lr_schedule cosine"
  [demo32_pack8_batch2_seed1]="scratch | $DEMO_PRE --seed 1 | --epochs 32 --batch_size 2 --pack_questions 8 --seed 1 --lr_schedule cosine"
  [demo32_pack8_constlr_seed1]="scratch | $DEMO_PRE --seed 1 | --epochs 32 --batch_size 4 --pack_questions 8 --seed 1 --lr_schedule constant"
  [demo32_pack8_constlr]="scratch | $DEMO_PRE | --epochs 32 --batch_size 4 --pack_questions 8 --lr_schedule constant"
  [demo32_pack8_constlr_seed2]="scratch | $DEMO_PRE --seed 2 | --epochs 32 --batch_size 4 --pack_questions 8 --seed 2 --lr_schedule constant"
  [demo32_pack8_wsd]="scratch | $DEMO_PRE | --epochs 32 --batch_size 4 --pack_questions 8 --lr_schedule wsd"
  [demo32_pack8_wsd_seed1]="scratch | $DEMO_PRE --seed 1 | --epochs 32 --batch_size 4 --pack_questions 8 --seed 1 --lr_schedule wsd"
  [demo32_pack8_wsd_seed2]="scratch | $DEMO_PRE --seed 2 | --epochs 32 --batch_size 4 --pack_questions 8 --seed 2 --lr_schedule wsd"
  [guide_wsd]="scratch | --lr_schedule wsd | --lr_schedule wsd"     # wsd in both stages
  [demo48_pack8_seed1]="scratch | $DEMO_PRE --seed 1 | --epochs 48 --batch_size 4 --pack_questions 8 --seed 1 --lr_schedule cosine"
  [guide_epochs16]="scratch | | --epochs 16 --lr_schedule cosine"
  [guide_batch8]="scratch | | --batch_size 8 --lr_schedule cosine"
  [guide_lr2e-3]="scratch | --learning_rate 2e-3 | --learning_rate 2e-3 --lr_schedule cosine"
  [guide_lr3e-3]="scratch | --learning_rate 3e-3 | --learning_rate 3e-3 --lr_schedule cosine"
  [guide_pack8]="scratch | | --batch_size 4 --pack_questions 8 --lr_schedule cosine"
  [guide_seed1]="scratch | --seed 1 | --seed 1"
  [guide_seed2]="scratch | --seed 2 | --seed 2"
  [guide_look]="scratch | --look_loss 0 | --look_loss 1"            # attention grounding on the boxes, stage 2 only
  [guide_nolook]="scratch | --look_loss 0 | --look_loss 0"          # the defaults before Learning II
  [guide_nolook_seed1]="scratch | --look_loss 0 --seed 1 | --look_loss 0 --seed 1"
  [guide_nolook_seed2]="scratch | --look_loss 0 --seed 2 | --look_loss 0 --seed 2"
  [guide_seed2_]="scratch | --seed 2 | --seed 2"
  [demo32_look]="scratch | $DEMO_PRE | --epochs 32 --batch_size 4 --pack_questions 8 --lr_schedule constant"
  [demo32_look_seed1]="scratch | $DEMO_PRE --seed 1 | --epochs 32 --batch_size 4 --pack_questions 8 --lr_schedule constant --seed 1"
  [demo32_look_seed2]="scratch | $DEMO_PRE --seed 2 | --epochs 32 --batch_size 4 --pack_questions 8 --lr_schedule constant --seed 2"
  # DEMO=hard now: stage 1 at its default 4 epochs (the box questions are learned there), stage 2 as before
  [demohard]="scratch | | --epochs 32 --batch_size 4 --pack_questions 8 --lr_schedule constant"
  [demohard_seed1]="scratch | --seed 1 | --epochs 32 --batch_size 4 --pack_questions 8 --lr_schedule constant --seed 1"
  [demohard_seed2]="scratch | --seed 2 | --epochs 32 --batch_size 4 --pack_questions 8 --lr_schedule constant --seed 2"
  [guide_look_both]="scratch | --look_loss 1 | --look_loss 1"
  [guide_look_both_seed1]="scratch | --look_loss 1 --seed 1 | --look_loss 1 --seed 1"
  [guide_look_both_seed2]="scratch | --look_loss 1 --seed 2 | --look_loss 1 --seed 2"
  # Learning III schedules (stage 1 now trains on the task too; stage 2's re-warm spiked validation loss)
  [guide_s1const]="scratch | --lr_schedule constant | "             # one stable phase over both stages
  [guide_decay0.5]="scratch | | --decay_ratio 0.5"                  # a longer final anneal in stage 2
  [guide_lr5e-4]="scratch | | --learning_rate 5e-4"                 # stage 2 continues a task-trained model (the default since)
  [guide_none]="scratch | --look_contrast none | --look_contrast none"   # no look targets without boxes
  [guide_none_seed1]="scratch | --look_contrast none --seed 1 | --look_contrast none --seed 1"
  [guide_none_seed2]="scratch | --look_contrast none --seed 2 | --look_contrast none --seed 2"
  [llm_guide]="llm | | "
  [llm_lr1e-3]="llm | | --learning_rate 1e-3"
  [llm_demo32]="llm | $DEMO_PRE | --epochs 32 --batch_size 8 --pack_questions 4"
  [llm_demo32_lr1e-3]="llm | $DEMO_PRE | --epochs 32 --batch_size 8 --pack_questions 4 --learning_rate 1e-3"
)
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(guide guide_nolook guide_seed1 guide_seed2_ demohard)
for name in "${NAMES[@]}"; do
  [ -n "${V[$name]+x}" ] || { echo "unknown variant $name (known: ${!V[*]})"; exit 2; }
done
if printf '%s\n' "${NAMES[@]}" | grep -q '^llm_' && [ ! -f "$LLM" ]; then
  echo "== stand-in MiniMind2 weights (text-only LM on SLAKE's training questions) -> $LLM"
  $PY -m scripts.make_standin_llm --hidden_size 128 --num_hidden_layers "${LAYERS:-2}" --out "$LLM" > "$LLM.log" 2>&1
fi

run() {
  local name=$1 start pre sft out from_llm=() t0
  IFS='|' read -r start pre sft <<< "${V[$name]}"
  start=$(echo $start)
  out=$SWEEP/$name
  rm -rf "$out"; mkdir -p "$out"
  [ "$start" = llm ] && from_llm=(--from_llm "$LLM")
  local model=(--vision_model random-tiny --hidden_size 128 --num_hidden_layers "${LAYERS:-2}" --num_attention_heads 4
               --num_key_value_heads 2 --images_path "$IMAGES" --out_dir "$out" --cache_dir "$DATA/cache"
               --log_interval 1000)
  t0=$(date +%s)
  # shellcheck disable=SC2086
  $PY train_pretrain_vlm.py "${model[@]}" "${from_llm[@]}" --data_path "$DATA/medical_pretrain.jsonl" $pre \
    > "$out/pretrain.log" 2>&1 &&
  $PY train_sft_vlm.py "${model[@]}" --data_path "$DATA/medical_vqa_train.jsonl" \
    --val_path "$DATA/medical_vqa_validation.jsonl" $sft > "$out/sft.log" 2>&1 &&
  $PY eval_vlm.py --model_path "$out/medical_vlm_128.pth" --data_path "$DATA/medical_vqa_test.jsonl" \
    --train_path "$DATA/medical_vqa_train.jsonl" --images_path "$IMAGES" --out_dir "$out" \
    --cache_dir "$DATA/cache" > "$out/eval.log" 2>&1 || true
  $PY - "$name" "$out" "$(( $(date +%s) - t0 ))" "${V[$name]}" <<'PY' | tee -a "$SWEEP/results.txt"
import json, sys
name, out, secs, spec = sys.argv[1:5]
try:
    m = json.load(open(f"{out}/eval/medical_vlm_128/metrics.json"))
except OSError:
    print(f"{name:18s} FAILED (see {out}/*.log)"); sys.exit()
b = m["baselines"]["majority_per_question"]; u = m["image_use"]
f = lambda x: "-" if x is None else f"{100 * x:.1f}"
lead = lambda k: f"{100 * (m[k] - b[k]):+.1f}"
print(f"{name:18s} closed {f(m['closed_accuracy'])} ({lead('closed_accuracy')}) open {f(m['open_accuracy'])} "
      f"({lead('open_accuracy')}) | against the prior: closed {f(u['closed']['against_prior_accuracy'])} open "
      f"{f(u['open']['against_prior_accuracy'])} | {secs} s | {' '.join(spec.split())}")
PY
}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$([ "${JOBS:-1}" -gt 1 ] && echo 1 || nproc)}
for name in "${NAMES[@]}"; do
  run "$name" &
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-1}" ]; do wait -n || true; done
done
wait
