"""Python API for notebooks: load a model once, ask about images.

    from evaluation.api import MedicalVQA
    vqa = MedicalVQA.load("out/medical_vlm_768.pth")          # or a model folder / hub id
    vqa.answer("scan.dcm", "Which organ is abnormal?")
    vqa.answer_many([("a.png", "Is this normal?"), ("b.jpg", "What modality is this?")])
    why = vqa.answer("scan.dcm", "Is there a cyst in the left lung?", explain=True)
    why.probability, why.alternatives, why.relevance, why.overlay.save("where.png")
    vqa.answer("scan.dcm", "Is the liver healthy?", abstain_below=0.8)   # "not sure" below 80 %

Same precision and decoding as ``eval_vlm.py``: features computed and rounded as in the
cache, the device's generation dtype, greedy decoding, batched with left padding.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dataset.contract import read_answers
from dataset.features import run_tower
from dataset.images import as_image
from evaluation.explain import Explanation, answer_sets, explain, read_answer_sets
from evaluation.relevance import DEFAULT_RELEVANCE
from evaluation.inference import generation_autocast
from model.checkpoint import LoadedCheckpoint, load_model
from model.config import IMAGE_PLACEHOLDER, resolve_path
from model.constrain import build_answer_trie
from model.generation import GenerationConfig, generate
from infra.runtime import pick_device
from model.tokenization import ChatEncoder, clean_question


YES_NO_OPENERS = {"is", "are", "does", "do", "did", "can", "could", "was", "were", "has", "have", "will",
                  "should", "would", "是否", "有没有"}


def guess_answer_type(question: str) -> str:
    """CLOSED for yes/no questions (by their first word), OPEN otherwise."""
    words = question.strip().lower().split()
    return "CLOSED" if words and (words[0] in YES_NO_OPENERS or question.strip().endswith("吗?")) else "OPEN"


class MedicalVQA:
    def __init__(self, checkpoint: LoadedCheckpoint, max_new_tokens: int = 32):
        self.ckpt = checkpoint
        self.model, self.tokenizer = checkpoint.model, checkpoint.tokenizer
        self.device = next(self.model.parameters()).device
        self.encoder = ChatEncoder(self.tokenizer, self.model.config.image_tokens)
        self.max_new_tokens = max_new_tokens
        self.trie = None
        self.sets: dict[str, list[str]] | None = None  # answer sets for explanations (candidates())

    @classmethod
    def load(cls, source: str | Path = "out/medical_vlm_768.pth", device: str = "auto",
             vision_model: str | None = None, max_new_tokens: int = 32) -> "MedicalVQA":
        """``source``: a .pth checkpoint, a model folder (scripts/export_hf.py) or a hub id."""
        return cls(load_model(source, pick_device(device), vision_model=vision_model), max_new_tokens)

    def constrain(self, train_path: str | Path = "dataset/medical_vqa_train.jsonl", mode: str = "closed"):
        """Answer-constrained decoding, as ``eval_vlm.py --constrain``: closed questions choose
        among the training split's closed answers ('closed'); open ones also among its answers
        ('all'); 'none' switches it off. Returns self."""
        if mode not in ("closed", "all", "none"):
            raise ValueError(f"constrain(mode=...) must be 'closed', 'all' or 'none', got {mode!r}")
        if mode == "none":
            self.trie = None
            return self
        train = read_answers(resolve_path(train_path))
        self.trie = build_answer_trie(self.tokenizer, [(r["answer"], r["answer_type"]) for r in train],
                                      self.model.config.eos_token_id, mode)
        self.sets = answer_sets(train)
        return self

    def candidates(self, train_path: str | Path = "dataset/medical_vqa_train.jsonl") -> "MedicalVQA":
        """The answer sets explanations score alternatives from: the training split's closed and
        open answers (without it, closed questions are scored over Yes / No and open answers get
        their own probability only). ``constrain`` loads them too. Returns self."""
        self.sets = read_answer_sets(resolve_path(train_path))
        return self

    def answer(self, image: str | Path | Image.Image, question: str, answer_type: str | None = None,
               explain: bool = False, abstain_below: float | None = None,
               relevance: str = DEFAULT_RELEVANCE) -> str | Explanation:
        """The answer to one question about one image (a path to PNG/JPEG/DICOM, a PIL image or a
        numpy array; all normalised as files are: dataset.images.as_image). ``explain=True``
        returns an ``Explanation`` (evaluation/explain.py): the probability, the alternatives,
        where it looked (``relevance``: a map over the patch grid, by the ``relevance`` method) and
        that map over the scan. ``abstain_below``: "not sure" when the answer's probability is
        lower (closed questions: over the answer set; open ones: of its tokens)."""
        if abstain_below is not None and not 0.0 <= abstain_below <= 1.0:
            raise ValueError(f"abstain_below must be a probability in [0, 1], got {abstain_below!r}")
        if not explain and abstain_below is None:
            return self.answer_many([(image, question)], answer_types=[answer_type])[0]
        why = self.explain_many([(image, question)], [answer_type], abstain_below, relevance)[0]
        return why if explain else why.answer

    def explain_many(self, items: list[tuple[str | Path | Image.Image, str]],
                     answer_types: list[str | None] | None = None, abstain_below: float | None = None,
                     relevance: str = DEFAULT_RELEVANCE, batch_size: int = 64) -> list[Explanation]:
        """``answer(..., explain=True)`` for several (image, question) pairs: the answers are
        generated in batches as by ``answer_many``, then each is explained from the same images
        and features (one scoring pass of its candidates, one relevance pass)."""
        out = []
        for kinds, images, prompts, feats, answers in self._chunks(items, batch_size, answer_types):
            with generation_autocast(self.device):
                for j, (image, prompt, answer, kind) in enumerate(zip(images, prompts, answers, kinds)):
                    out.append(explain(self.model, self.tokenizer, self.model.vision_tower, image, prompt,
                                       feats[j:j + 1], answer, kind, self.sets, relevance, abstain_below))
        return out

    def answer_many(self, items: list[tuple[str | Path | Image.Image, str]], batch_size: int = 64,
                    answer_types: list[str | None] | None = None) -> list[str]:
        """Answers for (image, question) pairs, generated in batches. ``answer_types`` (CLOSED /
        OPEN, or None to guess from the question's first word) matter only when constrained."""
        return [a for *_, answers in self._chunks(items, batch_size, answer_types) for a in answers]

    @torch.no_grad()
    def _chunks(self, items, batch_size: int, answer_types: list[str | None] | None):
        """Per batch of items: (answer types, images, prompts, tower features, answers)."""
        for i, (_, q) in enumerate(items):
            if not isinstance(q, str):
                raise TypeError(f"question {i} must be a string, got {type(q).__name__}")
        answer_types = answer_types or [None] * len(items)
        types = [t or guess_answer_type(q) for t, (_, q) in zip(answer_types, items)]
        tower = self.model.vision_tower
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            kinds = types[start:start + batch_size]
            images = [as_image(im, f"image {start + i}") for i, (im, _) in enumerate(chunk)]
            prompts = [self.encoder.encode([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{clean_question(q)}"}],
                                           add_generation_prompt=True).input_ids for _, q in chunk]
            feats = run_tower(tower, tower.preprocess(images), self.device)
            with generation_autocast(self.device):
                outs = generate(self.model, prompts, feats, GenerationConfig(max_new_tokens=self.max_new_tokens),
                                self.model.config.eos_token_id, self.model.config.pad_token_id, trie=self.trie,
                                answer_sets=kinds if self.trie is not None else None)
            yield kinds, images, prompts, feats, [self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                                                  for ids in outs]
