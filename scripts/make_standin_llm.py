"""A CPU-sized stand-in for MiniMind2 LLM weights, so the ``--from_llm`` start can be swept offline.

MiniMind2's ``llm_512.pth`` / ``llm_768.pth`` cannot be downloaded here and are too large for a
CPU sweep. This trains a language model of any size on text only (the questions and answers
of a SLAKE-layout release, no images) and saves it in MiniMind's transformers-style naming
(``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``, ``lm_head.weight``),
so ``--from_llm`` loads it through the same code path as the real files:

    python -m scripts.make_standin_llm --release ../shared/data/slake --hidden_size 128 \
        --num_hidden_layers 2 --out out/standin/llm_128.pth
    python train_pretrain_vlm.py --from_llm out/standin/llm_128.pth --hidden_size 128 --num_hidden_layers 2 ...

It knows the words of medical questions and their answer priors, never an image: a real
MiniMind2 model knows far more language, so treat sweeps with it as a direction, not a number.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from dataset.contract import read_utf8
from infra import flags
from model.checkpoint import atomic_save

log = logging.getLogger("standin_llm")


def text_conversations(release: Path, lang: str = "en") -> list[dict]:
    """Question/answer pairs of the release's training split as text-only conversations."""
    rows = json.loads(read_utf8(release / "train.json"))
    out = []
    for r in rows:
        question, answer = str(r.get("question", "")).strip(), str(r.get("answer", "")).strip()
        if question and answer and r.get("q_lang", "en") == lang:
            out.append({"conversations": [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}]})
    if not out:
        raise SystemExit(f"error: {release / 'train.json'} has no {lang} question/answer pairs")
    return out


def to_minimind_naming(model_state: dict) -> dict[str, torch.Tensor]:
    """This model's language-model weights under MiniMind's transformers-style names."""
    out = {}
    for key, value in model_state.items():
        if not key.startswith("llm."):
            continue  # projector, tuned vision blocks: not part of a language model
        name = key.removeprefix("llm.")
        out[name if name == "lm_head.weight" else f"model.{name}"] = value.detach().clone()
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", default="../shared/data/slake", help="folder with a SLAKE-layout train.json")
    ap.add_argument("--lang", default="en", choices=["en", "zh"])
    ap.add_argument("--hidden_size", type=flags.positive_int, default=128)
    ap.add_argument("--num_hidden_layers", type=flags.positive_int, default=2)
    ap.add_argument("--num_attention_heads", type=flags.positive_int, default=4)
    ap.add_argument("--num_key_value_heads", type=flags.positive_int, default=2)
    ap.add_argument("--epochs", type=flags.positive_int, default=4)
    ap.add_argument("--learning_rate", type=flags.positive_float, default=1e-3)
    ap.add_argument("--out", required=True, help="where to write the .pth (MiniMind naming)")
    args = ap.parse_args(argv)
    from trainer.cli import main as train_main
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "text.jsonl"
        rows = text_conversations(Path(args.release), args.lang)
        data.write_text("".join(json.dumps(c) + "\n" for c in rows), encoding="utf-8")
        rc = train_main("sft", [
            "--data_path", str(data), "--val_path", "", "--images_path", tmp, "--cache_dir", "",
            "--out_dir", tmp, "--from_weight", "none", "--vision_model", "random-tiny",
            "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
            "--num_attention_heads", str(args.num_attention_heads),
            "--num_key_value_heads", str(args.num_key_value_heads), "--epochs", str(args.epochs),
            "--learning_rate", str(args.learning_rate), "--batch_size", str(min(32, len(rows))), "--log_interval", "50"])
        if rc != 0:
            return rc
        state = torch.load(Path(tmp) / f"medical_vlm_{args.hidden_size}.pth", map_location="cpu", weights_only=True)
        weights = to_minimind_naming(state["model"])
    atomic_save(weights, args.out)
    log.info("wrote %s: %d tensors in MiniMind's transformers-style naming (use with --from_llm)", args.out,
             len(weights))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
