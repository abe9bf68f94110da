"""Convert SLAKE into the JSONL contract that the training and evaluation scripts read.

Run from any folder:
    python convert_slake_dataset.py                          # BoKelvin/SLAKE from the hub
    python convert_slake_dataset.py --slake_dir ~/data/Slake1.0
    python convert_slake_dataset.py --hub_id mdwiratathya/SLAKE-vqa-english
    python convert_slake_dataset.py --demo                   # built-in synthetic mini-SLAKE

Writes dataset/medical_vqa_{train,validation,test}.jsonl, dataset/medical_pretrain.jsonl,
dataset/medical_images/ and dataset/manifest.json (the data contract: docs/data.md).
"""
from __future__ import annotations

import argparse
import logging
import sys

from infra import flags
from model.config import resolve_path, user_path

log = logging.getLogger("convert")
DEFAULT_HUB_ID = "BoKelvin/SLAKE"  # dataset.slake.DEFAULT_HUB_ID (not imported before parsing: --help stays fast)
VERIFY_DEFAULT = "both"  # dataset.slake.VERIFY_DEFAULT (likewise; a test holds them equal)
IMPLIED_DEFAULT = "both"  # dataset.slake.IMPLIED_DEFAULT (likewise)


def parse_args(argv=None):
    ap = flags.ArgumentParser(description=__doc__)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--slake_dir", help="local copy of the SLAKE release or hub snapshot")
    src.add_argument("--hub_id", help="hub dataset with image/question/answer columns (or a local folder of it); "
                                      f"without any source flag: {DEFAULT_HUB_ID}")
    src.add_argument("--demo", nargs="?", const="easy",
                     choices=["easy", "easy-prior", "attribute-prior", "shifted-prior", "hard", "hard-prior"],
                     help="built-in synthetic set, no download: 'easy' (the quick start) or 'hard' (compositional "
                          "questions, yes/no balanced per question text: the answer priors are useless) or 'easy-prior' / "
                          "'hard-prior' (the same sets with yes/no texts that mostly have one usual answer, as in real "
                          "VQA sets: a trap for models that answer from the text) or 'attribute-prior' (the easy images; "
                          "yes/no questions name a value an open question asks about, in varied and negated phrasings, "
                          "each text with its own usual answer: a second trap) or 'shifted-prior' (easy-prior with "
                          "each image's anatomy moved and scaled, as real scans are not aligned: a third trap)")
    ap.add_argument("--also", action="append", default=[], metavar="SOURCE",
                    help="add the training split of another medical VQA dataset (repeatable): a release-layout "
                         "folder, a hub id or a local folder of image/question/answer parquet files (VQA-RAD, "
                         "PathVQA copies); SLAKE's validation and test splits stay as they are")
    ap.add_argument("--out_dir", default="dataset", help="where the dataset is written")
    ap.add_argument("--lang", choices=["en", "zh", "all"], default="en", help="which questions to keep")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    ap.add_argument("--allow_overlap", action="store_true", help="write a test split sharing images with train")
    ap.add_argument("--box_questions", action=argparse.BooleanOptionalAction, default=True,
                    help="add yes/no questions answered by each training image's organ/finding boxes "
                         "(detection.json: 'Is there a cyst in the left lung?') to the stage-1 data (default: on)")
    ap.add_argument("--verify_questions", choices=["none", "stage1", "both"], default=VERIFY_DEFAULT,
                    help="yes/no questions that check a named value against the image, made from the training "
                         "images' open answers ('What modality ...? Is it CT?' -> Yes / 'Is it MRI?' -> No), added to "
                         "the stage-1 data, or to both stages' training data (they teach yes/no questions to use "
                         "the image where the data has no boxes; 'none' trains 2-3x faster)")
    ap.add_argument("--implied_questions", choices=["none", "both"], default=IMPLIED_DEFAULT,
                    help="closed questions whose answer the same image's open answers imply (found from the "
                         "training images, e.g. 'Where is the lesion?' Left -> 'Is the lesion on the left side?' Yes), "
                         "added to both stages where they even out each closed text's Yes and No (default: both; "
                         "'none' leaves them out)")
    ap.add_argument("--split", choices=["release", "cp"], default="release",
                    help="'release': the source's own train/validation/test images; 'cp': a changing-prior "
                         "re-split of the same images (each question text's usual training answer is not its "
                         "usual test answer, as in VQA-CP / SLAKE-CP): tests whether a model reads the image. "
                         "Scores on it are not comparable with the release split's; cite it as a re-split")
    ap.add_argument("--seed", type=flags.non_negative_int, default=0, help="demo set seed, and the tie-break "
                                                                          "of --split cp")
    ap.add_argument("--demo_images", type=flags.positive_int, nargs=3, default=[300, 40, 60],
                    metavar=("TRAIN", "VAL", "TEST"), help="demo set images per split")
    args = ap.parse_args(argv)
    args.out_dir = user_path(args.out_dir, ap.get_default("out_dir"))
    args.slake_dir = user_path(args.slake_dir)
    args.also = [user_path(a, may_be_remote=True) for a in args.also]
    args.hub_id = user_path(args.hub_id, may_be_remote=True) if args.hub_id else args.hub_id
    return args


def main(argv=None) -> int:
    args = parse_args(argv)  # before the heavy imports: --help and flag mistakes answer at once
    from dataset.contract import MANIFEST
    from dataset.demo import write_demo_release
    from dataset.demo_hard import write_hard_release
    from dataset.slake import convert, download_release, merge_training_sources, read_hub_vqa, read_release, read_source
    from infra.errors import UserError
    from infra.runtime import setup_logging
    setup_logging()
    out_dir = resolve_path(args.out_dir)
    had = (out_dir / MANIFEST).is_file()
    kept = (f"Nothing in {out_dir} was changed (the previous dataset there is intact)." if had else
            f"No dataset was written to {out_dir}.")
    try:
        if args.demo:
            kind = {"easy": "", "easy-prior": "_prior", "attribute-prior": "_attribute_prior",
                    "shifted-prior": "_shifted_prior", "hard": "_hard",
                    "hard-prior": "_hard_prior"}[args.demo]
            if not args.demo.startswith("hard"):
                raw = write_demo_release(out_dir / f"slake_demo{kind}_raw", args.seed, *args.demo_images,
                                         prior=args.demo in ("easy-prior", "shifted-prior"),
                                         attribute=args.demo == "attribute-prior", shifted=args.demo == "shifted-prior")
            else:
                raw = write_hard_release(out_dir / f"slake_demo{kind}_raw", args.seed, *args.demo_images,
                                         prior=args.demo == "hard-prior")
            conv = read_release(raw)
            conv.source = f"demo{kind.replace('_', '-')}:seed={args.seed}"
        elif args.slake_dir:
            conv = read_release(resolve_path(args.slake_dir))
        elif args.hub_id:
            conv = read_hub_vqa(args.hub_id)
        else:
            conv = download_release(DEFAULT_HUB_ID)
        if args.also:
            conv = merge_training_sources(conv, [(spec, read_source(spec)) for spec in args.also])
        from evaluation.metrics import baselines
        manifest = convert(conv, out_dir, lang=args.lang, strict=args.strict, allow_overlap=args.allow_overlap,
                           box_qa=args.box_questions, priors=baselines, split=args.split, seed=args.seed,
                           verify_qa=args.verify_questions, implied_qa=args.implied_questions)
    except (UserError, OSError) as exc:
        print(f"error: {exc}\n{kept}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted. {kept}", file=sys.stderr)
        return 130
    c, t = manifest["counts"], manifest["answer_types"]
    log.info("source %s (lang %s)", manifest["source"], manifest["lang"])
    for split in c:
        log.info("  %-10s %5d questions %s, %d images", split, c[split], t[split], manifest["images"][split])
    log.info("  stage-1 captions: %d (training images only)%s", manifest["pretrain_captions"],
             f", and {manifest['pretrain_box_questions']} yes/no questions from their organ/finding boxes"
             if manifest.get("pretrain_box_questions") else "")
    if manifest.get("pretrain_verify_questions"):
        log.info("  verification questions from the open answers: %d (stage 1%s)", manifest["pretrain_verify_questions"],
                 " and stage 2" if manifest.get("train_verify_questions") else "")
    if manifest.get("implied_questions"):
        log.info("  closed questions implied by the open answers of the same image: %d (both stages)",
                 manifest["implied_questions"])
    if manifest.get("pretrain_train_questions"):
        log.info("  stage 1 also trains on the %d training questions", manifest["pretrain_train_questions"])
    log.info("  image overlap between splits: %s", manifest["image_overlap"])
    cp = manifest["split"]
    if cp["kind"] == "cp":
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
        log.info("  changing-prior re-split (--split cp, seed %d): for %d of %d question texts the usual test answer "
                 "is not the usual training answer; the test split keeps only questions whose answer is not "
                 "their text's usual training answer (%d dropped), so answering each closed question with "
                 "its text's commonest training answer scores %s there (%s on the release split). A model "
                 "that reads the image is not hurt by this; one that answers from the text is.",
                 cp["seed"], cp["texts_moved"], cp["texts_movable"], cp["test_questions_dropped"],
                 pct(cp["closed_prior_test_after"]),
                 pct(cp["closed_prior_test_before"]))
    for name, b in manifest.get("baselines_test", {}).items():
        log.info("  test-split baseline %-26s closed %s, open %s", name.replace("_", " "),
                 *(f"{100 * b[k]:.1f}%" if b[k] is not None else "-" for k in ("closed_accuracy", "open_accuracy")))
    for s in manifest["skipped"][:10]:
        log.info("  skipped %s qid %s: %s", s["split"], s["qid"], s["reason"])
    if len(manifest["skipped"]) > 10:
        log.info("  ... %d skipped in all, see %s", len(manifest["skipped"]), out_dir / MANIFEST)
    for note in manifest["notes"]:
        log.info("  note: %s", note)
    log.info("wrote %s", out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
