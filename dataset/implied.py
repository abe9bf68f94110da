"""Closed questions implied by the open answers of the same image (no boxes, no language rules).

A dataset that asks several questions per image often asks a closed question and an open question
about the same attribute: "Is the lesion on the left side?" and "Where is the lesion located?".
Wherever the training images show that the closed answer is a fixed function of the open answer
(Left -> Yes, Right -> No on every image asked both), the closed question's answer is known on every
other training image whose open answer is known. Those images give the closed text new examples,
answered by the image, of the answer its text rarely gets: the evidence a text-prior model lacks.

Implications are found from the data alone, so phrasing, negation ("Is the lesion *not* on the left
side?" maps Left -> No) and language need no rules. An implication is kept only when it holds on every
image asked both questions, at least ``MIN_SUPPORT`` images back each open answer used, and at least
two open answers give different closed answers (otherwise it says nothing the text does not).

Run through the converter: ``python convert_slake_dataset.py`` (on by default; ``--implied_questions
none`` leaves them out)."""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from dataset.resplit import text_key

MIN_SUPPORT = 3  # images per open answer before it is trusted to imply a closed answer


@dataclass(frozen=True)
class Implication:
    open_key: str  # text_key of the open question
    closed_key: str  # text_key of the closed question
    answers: tuple[tuple[str, str], ...]  # (open answer, implied closed answer), sorted

    def implied(self, open_answer: str) -> str | None:
        return dict(self.answers).get(open_answer)


def find_implications(per_image: dict[str, list[tuple[str, str, str]]],
                      min_support: int = MIN_SUPPORT) -> list[Implication]:
    """The (open text -> closed text) implications that hold on every training image asked both.
    ``per_image``: image -> (question, answer, answer_type) of its training questions."""
    seen: dict[tuple[str, str], dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for qas in per_image.values():
        opens = {(text_key(q), a) for q, a, t in qas if t == "OPEN"}
        closed = {(text_key(q), a) for q, a, t in qas if t == "CLOSED"}
        for okey, oa in opens:
            for ckey, ca in closed:
                seen[(okey, ckey)][oa][ca] += 1
    found = []
    for (okey, ckey), by_open in sorted(seen.items()):
        if any(len(c) > 1 for c in by_open.values()):  # one counter-example: no implication
            continue
        trusted = {oa: next(iter(c)) for oa, c in by_open.items() if sum(c.values()) >= min_support}
        if len(set(trusted.values())) >= 2:
            found.append(Implication(okey, ckey, tuple(sorted(trusted.items()))))
    return found


def implied_questions(per_image: dict[str, list[tuple[str, str, str]]], seed: int = 0,
                      min_support: int = MIN_SUPPORT) -> dict[str, list[tuple[str, str]]]:
    """New (question, answer) pairs per training image: each closed text, on images not asked it
    whose open answers imply its answer, with the answers it has fewer of, until its answers are as
    even as the images allow (never past even: the text's usual answer is never added). Where two
    implications disagree on an image, it gets neither. Seeded: the same data and seed, the same
    questions."""
    rules = find_implications(per_image, min_support)
    by_open: dict[str, list[Implication]] = defaultdict(list)
    for rule in rules:
        by_open[rule.open_key].append(rule)
    counts: dict[str, Counter] = defaultdict(Counter)
    wording: dict[str, str] = {}
    for key in sorted(per_image):
        for q, a, t in per_image[key]:
            if t == "CLOSED":
                counts[text_key(q)][a] += 1
                wording.setdefault(text_key(q), q.strip())
    candidates: dict[str, list[tuple[str, str]]] = defaultdict(list)  # closed key -> (image, implied answer)
    for key in sorted(per_image):
        asked = {text_key(q) for q, _, _ in per_image[key]}
        implied: dict[str, set] = defaultdict(set)
        for q, a, t in per_image[key]:
            if t != "OPEN":
                continue
            for rule in by_open.get(text_key(q), []):
                answer = rule.implied(a)
                if rule.closed_key not in asked and answer is not None:
                    implied[rule.closed_key].add(answer)
        for ckey, answers in sorted(implied.items()):
            if len(answers) == 1:
                candidates[ckey].append((key, answers.pop()))
    rng = random.Random(seed)
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ckey in sorted(candidates):
        pool = candidates[ckey]
        rng.shuffle(pool)
        have = counts[ckey]
        for key, answer in pool:
            if have[answer] < max(have.values()):
                have[answer] += 1
                out[key].append((wording[ckey], answer))
    return {key: out[key] for key in sorted(out)}
