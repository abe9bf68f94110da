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
from dataset.contract import read_answers
from model.tokenization import answer_ids
from evaluation.relevance import DEFAULT_RELEVANCE, model_view, overlay, relevance_maps
from evaluation.scoring import next_token_log_probs, pair_log_likelihoods

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


def read_answer_sets(train_path) -> dict[str, list[str]]:
    """``answer_sets`` of a training split's file."""
    return answer_sets(read_answers(train_path))


def score_answers(model, tok, prompts: list[list[int]], features: torch.Tensor, answers: list[str],
                  question_types: list[str], sets: dict[str, list[str]] | None = None,
                  chunk: int = 8) -> list[tuple[float, list[tuple[str, float]], str]]:
    """For each question: (probability of its answer, the alternatives with theirs, likeliest
    first, and what the probability is over: 'candidates' or 'tokens'); see the module
    docstring. ``features`` [n, tokens, width]: each prompt's image. Scored ``chunk`` questions
    (with all their candidates) per teacher-forced pass."""
    eos = model.config.eos_token_id
    sets = sets or {}
    open_pool = list(sets.get("OPEN") or [])
    heads = torch.tensor([answer_ids(tok, a, eos)[0] for a in open_pool], dtype=torch.long)  # first tokens
    out = []
    for start in range(0, len(prompts), chunk):
        ps, fs = prompts[start:start + chunk], features[start:start + chunk]
        kinds, given = question_types[start:start + chunk], answers[start:start + chunk]
        first = None
        if open_pool and any(k != "CLOSED" for k in kinds):  # the likeliest open answers by their first token
            first = next_token_log_probs(model, ps, fs).cpu()
        cand_lists = []
        for j, (kind, answer) in enumerate(zip(kinds, given)):
            if kind == "CLOSED":
                pool = list(sets.get("CLOSED") or DEFAULT_CLOSED)
            elif first is not None:
                order = torch.argsort(first[j][heads], descending=True)[:OPEN_CANDIDATES].tolist()
                pool = [open_pool[k] for k in order]
            else:
                pool = []
            cand_lists.append([answer] + [a for a in pool if normalize(a) != normalize(answer)])
        pairs = [(j, answer_ids(tok, a, eos)) for j, cands in enumerate(cand_lists) for a in cands]
        ll = pair_log_likelihoods(model, ps, fs, pairs).float().cpu()
        at = 0
        for kind, cands in zip(kinds, cand_lists):
            row, at = ll[at:at + len(cands)], at + len(cands)
            closed = kind == "CLOSED"
            probs = torch.softmax(row, -1) if closed else row.exp()
            alts = sorted(((a, float(p)) for a, p in zip(cands[1:], probs[1:].tolist())), key=lambda x: -x[1])
            out.append((float(probs[0]), alts, "candidates" if closed else "tokens"))
    return out


def score_answer(model, tok, prompt: list[int], features: torch.Tensor, answer: str, question_type: str,
                 sets: dict[str, list[str]] | None = None) -> tuple[float, list[tuple[str, float]], str]:
    """``score_answers`` for one question (``features`` [1, tokens, width])."""
    return score_answers(model, tok, [prompt], features, [answer], [question_type], sets)[0]


def explain(model, tok, tower, image: Image.Image, prompt: list[int], features: torch.Tensor, answer: str,
            question_type: str, sets: dict[str, list[str]] | None = None, method: str = DEFAULT_RELEVANCE,
            abstain_below: float | None = None) -> Explanation:
    """The explanation of ``answer`` (the model's answer to ``prompt`` about ``image``, whose
    tower features are ``features`` [1, tokens, width])."""
    eos = model.config.eos_token_id
    probability, alternatives, scored_over = score_answer(model, tok, prompt, features, answer, question_type, sets)
    rel = relevance_maps(model, [prompt], features, method, [answer_ids(tok, answer, eos)])[0].float().cpu()
    grid = int(round(rel.numel() ** 0.5))
    square = grid * grid == rel.numel()  # a tower without a square patch grid gets the flat map and no overlay
    abstained = abstain_below is not None and probability < abstain_below
    return Explanation(answer=NOT_SURE if abstained else answer, probability=probability, alternatives=alternatives,
                       scored_over=scored_over, relevance=(rel.view(grid, grid) if square else rel).numpy(),
                       method=method, overlay=overlay(model_view(tower, image), rel) if square else None,
                       model_answer=answer,
                       abstained=abstained, question_type=question_type)
