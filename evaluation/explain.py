"""Why an answer: its probability, the alternatives, and where in the scan it came from.

One function, ``explain``, behind the API (``MedicalVQA.answer(..., explain=True)``) and the
web demo:

* closed questions: every answer of the closed answer set (the training split's closed answers,
  or Yes / No, SLAKE's, when none is loaded) plus the model's own answer is scored in one
  batched teacher-forced pass (evaluation.scoring); the softmax over the set is a proper
  distribution, so ``probability`` is the model's confidence and ``alternatives`` the other
  answers with theirs. This is what eval_vlm.py calibrates (ECE, reliability diagram).
* open questions: ``probability`` is the product of the answer's token probabilities; with an
  open answer set loaded, the ``OPEN_CANDIDATES`` answers whose first token the model finds
  likeliest are scored the same way, and ``alternatives`` are those with their own (sequence)
  probabilities.
* ``relevance``: the relevance map of the answer over the patch grid (evaluation.relevance),
  and ``overlay``: that map over the scan as the vision tower saw it.
* ``abstain_below``: below this probability the answer is "not sure" (the model's own answer
  stays in ``model_answer``); eval_vlm.py reports what each threshold costs in coverage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from dataset.answers import normalize
from evaluation.relevance import DEFAULT_RELEVANCE, model_view, overlay, relevance_maps
from evaluation.scoring import candidate_log_likelihoods

NOT_SURE = "not sure"
DEFAULT_CLOSED = ("Yes", "No")  # SLAKE's closed answers, when no training split is loaded
OPEN_CANDIDATES = 24  # open answers scored per question (the likeliest by their first token)


@dataclass
class Explanation:
    answer: str                 # what the model says ("not sure" when it abstained)
    probability: float          # of model_answer: over the candidate set (closed) or of its tokens (open)
    alternatives: list[tuple[str, float]]  # the other candidates, likeliest first
    scored_over: str            # "candidates" (closed: a distribution over the set) or "tokens" (open)
    relevance: np.ndarray       # [grid, grid]: where it looked, summing to 1
    method: str                 # how relevance was computed (evaluation.relevance.METHODS)
    overlay: Image.Image | None  # relevance over the scan as the vision tower saw it (None: no square grid)
    model_answer: str           # the model's own answer, also when it abstained
    abstained: bool = False
    question_type: str = "OPEN"
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        alts = ", ".join(f"{a} {100 * p:.0f}%" for a, p in self.alternatives[:3])
        head = (f"{NOT_SURE} (the model's answer: {self.model_answer}, {100 * self.probability:.0f}%)"
                if self.abstained else f"{self.answer} ({100 * self.probability:.0f}%)")
        return head + (f"; alternatives: {alts}" if alts else "")


def answer_sets(records: list[dict]) -> dict[str, list[str]]:
    """{'CLOSED': [...], 'OPEN': [...]}: each split's distinct answers (by their normalised form,
    shown in their commonest spelling), commonest first."""
    counts: dict[str, dict[str, dict[str, int]]] = {"CLOSED": {}, "OPEN": {}}
    for r in records:
        forms = counts.get(r["answer_type"], {}).setdefault(normalize(r["answer"]), {})
        forms[r["answer"]] = forms.get(r["answer"], 0) + 1
    return {kind: [max(f, key=lambda a: (f[a], a)) for f in sorted(table.values(), key=lambda f: -sum(f.values()))]
            for kind, table in counts.items()}


def _ids(tok, text: str, eos: int) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eos]


@torch.inference_mode()
def _first_token_logprobs(model, prompt: list[int], features: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([prompt], device=features.device)
    return torch.log_softmax(model(ids, features, logits_to_keep=1)[0, -1].float(), -1)


def score_answer(model, tok, prompt: list[int], features: torch.Tensor, answer: str, question_type: str,
                 sets: dict[str, list[str]] | None = None) -> tuple[float, list[tuple[str, float]], str]:
    """(probability of ``answer``, the alternatives with theirs (likeliest first), what the
    probability is over: 'candidates' or 'tokens'); see the module docstring."""
    eos = model.config.eos_token_id
    sets = sets or {}
    closed = question_type == "CLOSED"
    if closed:
        pool = list(sets.get("CLOSED") or DEFAULT_CLOSED)
    else:
        pool = list(sets.get("OPEN") or [])
        if pool:  # the likeliest by their first token: the set can be hundreds of answers
            first = _first_token_logprobs(model, prompt, features)
            pool = sorted(pool, key=lambda a: -float(first[_ids(tok, a, eos)[0]]))[:OPEN_CANDIDATES]
    mine = next((a for a in pool if normalize(a) == normalize(answer)), None)
    cands = [answer] + [a for a in pool if a is not mine and normalize(a) != normalize(answer)]
    ll = candidate_log_likelihoods(model, [prompt], features, [_ids(tok, a, eos) for a in cands])[0].float().cpu()
    probs = torch.softmax(ll, -1) if closed else ll.exp()
    alternatives = sorted(((a, float(p)) for a, p in zip(cands[1:], probs[1:].tolist())), key=lambda x: -x[1])
    return float(probs[0]), alternatives, "candidates" if closed else "tokens"


def explain(model, tok, tower, image: Image.Image, prompt: list[int], features: torch.Tensor, answer: str,
            question_type: str, sets: dict[str, list[str]] | None = None, method: str = DEFAULT_RELEVANCE,
            abstain_below: float | None = None) -> Explanation:
    """The explanation of ``answer`` (the model's answer to ``prompt`` about ``image``, whose
    tower features are ``features`` [1, tokens, width])."""
    eos = model.config.eos_token_id
    probability, alternatives, scored_over = score_answer(model, tok, prompt, features, answer, question_type, sets)
    rel = relevance_maps(model, [prompt], features, method, [_ids(tok, answer, eos)])[0].float().cpu()
    grid = int(round(rel.numel() ** 0.5))
    square = grid * grid == rel.numel()  # a tower without a square patch grid gets the flat map and no overlay
    abstained = abstain_below is not None and probability < abstain_below
    return Explanation(answer=NOT_SURE if abstained else answer, probability=probability, alternatives=alternatives,
                       scored_over=scored_over, relevance=(rel.view(grid, grid) if square else rel).numpy(),
                       method=method, overlay=overlay(model_view(tower, image), rel) if square else None,
                       model_answer=answer,
                       abstained=abstained, question_type=question_type)
