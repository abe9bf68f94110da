"""Evaluate a trained model on the SLAKE test split, or ask it about one image.

Run from any folder:
    python eval_vlm.py --model_mode 1                 # SFT model on dataset/medical_vqa_test.jsonl
    python eval_vlm.py --model_mode 0                 # the stage-1 (pretrain) model
    python eval_vlm.py --model_mode 1 --image scan.dcm --question "Which organ is abnormal?"
    python eval_vlm.py --model_mode 1 --image scan.png          # interactive questions
Writes out/eval/<checkpoint name>/metrics.json and predictions.jsonl.
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from infra import flags
from model.config import resolve_path, user_path

log = logging.getLogger("eval")
MODES = {0: "pretrain", 1: "sft"}
# evaluation.relevance.METHODS, the first being its DEFAULT_RELEVANCE (listed here so --help needs no torch;
# a test holds them equal)
RELEVANCE_METHODS = ("look", "rollout", "grad_x_input", "attn_grad")


def parse_args(argv=None):
    ap = flags.ArgumentParser(description=__doc__)
    g0 = ap.add_argument_group("which model")
    g0.add_argument("--model_mode", type=int, choices=[0, 1], default=1, help="0 = pretrain model, 1 = SFT model")
    g0.add_argument("--hidden_size", type=flags.positive_int, default=768, help="picks the default checkpoint name")
    g0.add_argument("--use_moe", action="store_true", help="picks the default checkpoint name (_moe)")
    g0.add_argument("--out_dir", default="out", help="where checkpoints are and eval/ is written")
    g0.add_argument("--model_path", help="checkpoint to evaluate: a .pth, a model folder (export_hf) or a hub id "
                                         "(overrides --model_mode/--hidden_size)")
    g0.add_argument("--vision_model", help="load the vision tower from here instead of the stored id "
                                           "(its weights must match the checkpoint)")
    g1 = ap.add_argument_group("data")
    g1.add_argument("--data_path", default="dataset/medical_vqa_test.jsonl", help="the questions to evaluate (JSONL)")
    g1.add_argument("--train_path", default="dataset/medical_vqa_train.jsonl", help="for the answer baselines")
    g1.add_argument("--images_path", default="dataset/medical_images", help="folder the 'image' paths are relative to")
    g1.add_argument("--cache_dir", default="dataset/cache", help="frozen-feature cache ('' = none)")
    g2 = ap.add_argument_group("one image instead of a split")
    g2.add_argument("--image", help="answer questions about this PNG/JPEG/DICOM image instead")
    g2.add_argument("--question", type=flags.text("question"),
                    help="with --image: one question (otherwise an interactive prompt)")
    g2.add_argument("--temperature", type=flags.float_range(0, 10), default=0.0, help="0 = greedy")
    g2.add_argument("--top_p", type=flags.float_range(0, 1, lo_open=True), default=1.0,
                    help="nucleus sampling (with --temperature > 0)")
    g3 = ap.add_argument_group("what the evaluation reports")
    g3.add_argument("--constrain", choices=["none", "closed", "all"], default="none",
                    help="also decode with answers restricted to the training split's: closed questions to its "
                         "closed answers ('closed'), and open ones to its answer vocabulary ('all'); both results "
                         "are reported")
    g3.add_argument("--relevance", choices=[*RELEVANCE_METHODS, "all"], default=RELEVANCE_METHODS[0],
                    help="how the pointing game and --overlays find where the model looked: look (the head "
                         "--look_loss trains), rollout (attention rollout), grad_x_input, attn_grad (attention x "
                         "its gradient); all: score every method (docs/evaluation.md)")
    g3.add_argument("--overlays", type=flags.non_negative_int, default=0,
                    help="write the relevance map over the scan for this many questions (spread over the split) "
                         "to out/eval/<name>/overlays/")
    g3.add_argument("--explain", action="store_true",
                    help="give every prediction in predictions.jsonl its probability and top alternatives "
                         "(batched scoring passes; closed: over the training split's closed answers, open: the "
                         "product of its token probabilities)")
    g3.add_argument("--abstain_below", type=flags.float_range(0, 1), default=None,
                    help="also report coverage and accuracy on closed questions when answers below this "
                         "probability are withheld ('not sure')")
    g4 = ap.add_argument_group("hardware and generation")
    g4.add_argument("--device", default="auto", help=flags.DEVICE_HELP)
    g4.add_argument("--batch_size", type=flags.positive_int, default=64, help="questions generated together")
    g4.add_argument("--max_new_tokens", type=flags.int_range(1, 1024), default=32, help="longest answer, in tokens")
    args = ap.parse_args(argv)
    for name in ("out_dir", "data_path", "train_path", "images_path", "cache_dir", "image", "vision_model", "model_path"):
        setattr(args, name, user_path(getattr(args, name), ap.get_default(name),
                                      may_be_remote=name in ("model_path", "vision_model")))
    if args.question is not None and not args.image:
        ap.error("--question needs --image (the picture the question is about)")
    if args.image:  # before any heavy import: a wrong path answers at once
        image = resolve_path(args.image)
        if not image.exists():
            ap.error(f"argument --image: {image} does not exist")
        if image.is_dir():
            ap.error(f"argument --image: {image} is a folder; give one image file (PNG, JPEG or DICOM)")
    if args.question is not None:
        from model.tokenization import clean_question  # imports transformers: after the path checks
        try:
            args.question = clean_question(args.question)
        except ValueError as exc:
            ap.error(f"argument --question: {exc}")
    return args


def ask(ckpt, image, question: str | None, gen_cfg) -> int:
    """Answers ``question`` (or questions typed at a prompt) about ``image`` (a loaded PIL image)."""
    from evaluation.inference import answer_stream
    from model.tokenization import clean_question
    questions = [question] if question is not None else None
    while True:
        if questions is None:
            try:
                q = input("question (empty line to quit)> ").strip()
            except EOFError:
                return 0
            if not q:
                return 0
            try:
                q = clean_question(q)
            except ValueError as exc:
                print(f"({exc})")
                continue
        elif questions:
            q = questions.pop()
        else:
            return 0
        shown = ""
        for text in answer_stream(ckpt, [image], [], q, gen_cfg):
            print(text[len(shown):], end="", flush=True)
            shown = text
        print()


def eval_name(path) -> str:
    """out/eval/<name>/ for a .pth, a model folder or a hub id: the last part of the path once
    '..' and '.' are resolved, reduced to safe characters, so results never land outside out/eval."""
    from model.pretrained import looks_like_hub_id  # here: --help never imports the model code
    spec = str(path)
    last = Path(spec).name if looks_like_hub_id(spec) else resolve_path(spec).resolve().name
    name = re.sub(r"[^\w.-]+", "_", last.removesuffix(".pth")).strip("._")
    return name or "model"


def main(argv=None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help and flag mistakes answer at once
    from dataset.images import ImageReadError
    from evaluation.runner import evaluate_split, format_table
    from infra.errors import UserError
    from infra.runtime import pick_device, setup_logging
    from model.checkpoint import checkpoint_path, load_model
    from model.generation import GenerationConfig
    setup_logging()
    stage = MODES[args.model_mode]
    path = args.model_path if args.model_path else checkpoint_path(
        args.out_dir, stage, args.hidden_size, args.use_moe)
    name = eval_name(path)
    image = None
    if args.image:  # checked before the model loads: a wrong path answers at once
        from dataset.images import load_image
        try:
            image = load_image(resolve_path(args.image))
        except ImageReadError as exc:
            log.error("error: --image: %s", exc)
            return 2
    try:
        device = pick_device(args.device)
        ckpt = load_model(path, device, vision_model=args.vision_model,
                          stage_hint=None if args.model_path else stage)
        log.info("%s: stage %s, step %d | %s", ckpt.path, ckpt.stage, ckpt.step, ckpt.model.parameter_line())
        gen_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p)
        if image is not None:
            return ask(ckpt, image, args.question, gen_cfg)
        metrics = evaluate_split(ckpt, resolve_path(args.data_path), resolve_path(args.images_path),
                                 resolve_path(args.train_path) if args.train_path else None,
                                 resolve_path(args.out_dir) / "eval" / name, device, args.batch_size,
                                 args.max_new_tokens, resolve_path(args.cache_dir) if args.cache_dir else None,
                                 constrain=args.constrain, relevance=args.relevance, overlays=args.overlays,
                                 abstain_below=args.abstain_below, explain_answers=args.explain)
    except (FileNotFoundError, UserError) as exc:
        log.error("error: %s", exc)
        return 2  # a user-caused error: one named message, exit code 2
    except KeyboardInterrupt:
        log.error("\ninterrupted; no metrics were written (earlier results in %s are untouched)",
                  resolve_path(args.out_dir) / "eval")
        return 130
    print(format_table(metrics))
    print(f"generation: {metrics['generation_seconds']:.1f} s for {metrics['count']['all']} questions; "
          f"wrote {resolve_path(args.out_dir) / 'eval' / name}/metrics.json")
    if metrics.get("baselines_chart"):
        print(f"the model against the answer priors, as a picture: {metrics['baselines_chart']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
