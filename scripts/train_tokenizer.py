"""Train the byte-level BPE tokenizer shipped in model/tokenizer/.

Run from the repository root:
    python -m scripts.train_tokenizer                       # rebuild model/tokenizer/
    python -m scripts.train_tokenizer --input my_text.txt --input more.jsonl --vocab_size 6400 \
        --out_dir out/my_tokenizer

The built-in corpus is a medical-VQA vocabulary (question phrasings, anatomy, modalities,
findings); ``--input`` adds your own text (.txt lines, .jsonl with "conversations", or a
SLAKE release split such as train.json, whose English and Chinese questions and answers are
all used). The shipped tokenizer was built with
    python -m scripts.train_tokenizer --input ../shared/data/slake/train.json
(SLAKE's training split only, both languages: validation and test text is never seen).
Byte-level BPE encodes any text, so words outside the corpus still work, only longer.
Special tokens get fixed ids: <|endoftext|>=0 (padding), <|im_start|>=1, <|im_end|>=2,
<|image_pad|>=3.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dataset.contract import DataError, read_utf8
from infra import flags
from model.config import DEFAULT_TOKENIZER, resolve_path
from model.tokenization import CHAT_TEMPLATE, IM_END, IM_START, IMAGE_TOKEN, PAD_TOKEN

QUESTIONS = [
    "What modality is used to take this image?", "Which part of the body does this image belong to?",
    "What is the main organ in the image?", "Which organ is abnormal?", "Is this image normal?",
    "Is this image abnormal?", "Does the picture contain {o}?", "Where is the {o}?",
    "Where is the abnormality located?", "What is the largest organ in the picture?",
    "How many {o} are there in this image?", "How many lesions are in the image?",
    "What scanning plane does this image belong to?", "Is this a {m} image?", "Is this an {m} scan?",
    "What diseases are included in the picture?", "Which is the biggest in this image, {o} or {p}?",
    "What color is the {o} in the picture?", "What is the shape of the {o}?",
    "What is the function of the {o}?", "Which organs appear in the image?",
    "Does the {o} look healthy?", "Is the lesion on the left or the right?", "How big is the lesion?",
    "Is the lesion large or small?", "What kind of abnormality is in the {o}?",
    "Where is the brain edema?", "Where is the tumor?", "Is there a mass in the {o}?",
    "Which side of the {o} is abnormal, left or right?", "What organ system is primarily present?",
    "Is the {o} enlarged?", "Which organ is located in the upper left of the image?",
    "What is the weight of the {o} in an adult?", "Which organ can detoxify?",
    "Can {o} be seen in this picture?", "Is there a lesion in the {o}?",
]
ORGANS = [
    "liver", "lung", "left lung", "right lung", "heart", "spleen", "kidney", "left kidney",
    "right kidney", "brain", "brainstem", "cerebellum", "spinal cord", "stomach", "bladder",
    "colon", "small bowel", "rectum", "pancreas", "gallbladder", "esophagus", "trachea",
    "duodenum", "aorta", "eyes", "optic nerve", "temporal lobe", "parotid", "larynx",
    "mandible", "femoral head", "prostate", "uterus", "bone", "rib", "vertebra", "thyroid",
]
MODALITIES = ["CT", "MRI", "X-Ray", "T1", "T2", "FLAIR", "DWI", "ultrasound", "PET"]
ANSWERS = [
    "Yes", "No", "Left", "Right", "Top", "Bottom", "Center", "Upper left", "Lower right",
    "Head", "Chest", "Abdomen", "Pelvic Cavity", "Neck", "Brain", "Lung", "Transverse Plane",
    "Coronal Plane", "Sagittal Plane", "Lung Cancer", "Pneumonia", "Nodule", "Pleural Effusion",
    "Cardiomegaly", "Atelectasis", "Mass", "Edema", "Brain Tumor", "Brain Edema", "Liver Cancer",
    "Kidney Cyst", "Pneumothorax", "Infiltration", "Fracture", "None", "Small", "Large",
    "Medium", "Round", "Oval", "Irregular", "Black", "White", "Gray", "Hyperdense", "Hypodense",
    "Biotransformation, detoxification", "Respiration", "Pump blood", "Store bile", "Digestion",
    "0", "1", "2", "3", "4", "5", "one", "two", "three", "four", "five",
]
CAPTIONS = [
    "This is a {m} image of the {r}.", "The image is a {m} scan showing the {r}.",
    "It shows the {o} and the {p}.", "There is an abnormality in the {o}.",
    "No abnormality is visible.", "The {o} appears normal.", "A lesion is seen in the {o}.",
    "This image is taken in the transverse plane.", "The study is a chest X-ray in the coronal plane.",
]
CJK_CHAR = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"  # CJK, full-width
REGIONS = ["head", "chest", "abdomen", "pelvic cavity", "neck", "brain"]


def builtin_corpus() -> list[str]:
    texts = []
    for q, o, p, m in itertools.product(QUESTIONS, ORGANS, ORGANS[::3], MODALITIES[:4]):
        texts.append(q.format(o=o, p=p, m=m))
    for c, o, p, m, r in itertools.product(CAPTIONS, ORGANS, ORGANS[::5], MODALITIES[:3], REGIONS):
        texts.append(c.format(o=o, p=p, m=m, r=r))
    # Words appear capitalised and lower-case, alone and after a space, as answers do.
    words = ANSWERS + ORGANS + MODALITIES + REGIONS
    variants = {v for w in words for v in (w, w.lower(), w.title())}
    texts += sorted(variants) * 20 + sorted(f"The {v} and the {v}" for v in variants) * 5
    return texts


def read_inputs(paths: list[str]) -> list[str]:
    texts = []
    for p in paths:
        path = resolve_path(p)
        if not path.is_file():
            raise SystemExit(f"--input {p}: file not found")
        try:
            text = read_utf8(path)
        except DataError as exc:
            raise SystemExit(str(exc)) from None
        if path.suffix == ".json":  # a SLAKE release split: questions and answers of every language
            try:
                rows = json.loads(text)
                texts += [str(r[k]) for r in rows for k in ("question", "answer") if r.get(k) is not None]
            except (json.JSONDecodeError, TypeError, AttributeError) as exc:
                raise SystemExit(f"{path}: expected a JSON list of records with 'question'/'answer' ({exc})")
            continue
        for n, line in enumerate(text.split("\n"), 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                    texts += [m["content"].replace("<image>", "") for m in rec["conversations"]]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise SystemExit(f"{path}:{n}: expected a JSON object with 'conversations' ({exc})")
            else:
                texts.append(line)
    return texts


def train(texts: list[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    specials = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN]
    tok = Tokenizer(models.BPE())
    # Chinese has no spaces: left alone, BPE would merge whole repeated questions into single
    # tokens that unseen phrasings never use. Each CJK character is its own piece instead, so
    # a known character is one token (its 3 UTF-8 bytes merged) and any text still encodes.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_CHAR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i, f"special token {s} did not get id {i}"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=IM_END,
                                   additional_special_tokens=[IM_START, IMAGE_TOKEN],
                                   chat_template=CHAT_TEMPLATE, model_max_length=32768)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", default=[],
                    help="extra .txt, .jsonl or SLAKE .json corpus (repeatable)")
    ap.add_argument("--vocab_size", type=flags.int_range(300, 200_000), default=6400, help="upper bound; a small corpus yields fewer")
    ap.add_argument("--out_dir", default=DEFAULT_TOKENIZER)
    args = ap.parse_args()
    texts = builtin_corpus() + read_inputs(args.input)
    fast = train(texts, args.vocab_size, resolve_path(args.out_dir))
    print(f"trained on {len(texts)} texts: vocabulary {len(fast)} tokens -> {resolve_path(args.out_dir)}")


if __name__ == "__main__":
    main()
