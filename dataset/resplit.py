"""A changing-prior re-split of a VQA release (``convert_slake_dataset.py --split cp``).

Whether a model reads the image or answers from the question text is easiest to see when the
text's usual answer changes between training and test, as in VQA-CP (Agrawal et al., CVPR
2018) and the SLAKE-CP / VQA-RAD-CP re-splits of medical VQA: a model that learned "Is this a
CT image?" -> "Yes" from the text alone then scores far below 50 % on closed test questions,
while one that looks at the image is not hurt.

The re-split moves whole images (never one image on two sides) and keeps every split's image
count. Test images are chosen greedily: at each step the image whose questions most help
"for each question text, the commonest test answer is not the commonest answer overall" joins
the test split, until the test split has as many images as in the release; the validation
images are then drawn at random from the rest (they follow the training distribution, as in
VQA-CP, so model selection never sees the shifted answers). Each text's test quota of unusual
answers is its share of the test split, so training keeps examples of every answer.

Whole images carry several questions, most of them with their text's usual answer, so moving
images alone leaves the usual answer right about half the time on the test side. The test
split therefore keeps only the questions whose answer is *not* their text's commonest training
answer (``prior_conflicting``): a model that answers from the text scores 0 there, one that
reads the image scores what it can see. Numbers on such a split are not comparable with the
standard split's: cite it as a re-split of the release.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass


def text_key(question: str) -> str:
    """The question text that the priors are counted over (case and spacing ignored)."""
    return " ".join(question.lower().split())


@dataclass(frozen=True)
class QA:
    image: str
    question: str
    answer: str


@dataclass
class Resplit:
    split_of: dict[str, str]     # image -> "train" | "validation" | "test"
    texts_moved: int             # question texts whose commonest test answer is not the commonest training one
    texts_movable: int           # question texts with two or more answers, on both sides


def commonest(counts: Counter) -> str:
    """The most frequent answer (ties: the first in sorted order)."""
    return min(counts, key=lambda a: (-counts[a], a))


def _gains(by_image: dict[str, list[tuple[str, str]]], usual: dict[str, str], quota: dict[str, int],
           minor_in_test: Counter, image: str) -> float:
    """How much putting ``image`` into the test split helps: per question text, a question with
    a non-commonest answer counts +1 while that text's test quota of such answers is not yet
    filled; a question with the commonest answer counts -1 (each divided by the quota, so
    frequent and rare texts weigh alike)."""
    g = 0.0
    for text, answer in by_image[image]:
        if text not in quota:
            continue
        if answer == usual[text]:
            g -= 1.0 / quota[text]
        elif minor_in_test[text] < quota[text]:
            g += 1.0 / quota[text]
    return g


def changing_prior_split(qas: list[QA], n_validation: int, n_test: int, seed: int = 0) -> Resplit:
    """Assigns every image of ``qas`` a split (see the module doc). Deterministic in ``seed``."""
    by_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    answers: dict[str, Counter] = defaultdict(Counter)
    for qa in qas:
        t, a = text_key(qa.question), text_key(qa.answer)
        by_image[qa.image].append((t, a))
        answers[t][a] += 1
    images = sorted(by_image)
    if n_test + n_validation >= len(images):
        raise ValueError(f"a re-split needs training images: {len(images)} image(s) for {n_validation} "
                         f"validation and {n_test} test image(s)")
    rng = random.Random(seed)
    order = images[:]
    rng.shuffle(order)  # ties are broken in a seeded order
    rank = {img: i for i, img in enumerate(order)}
    usual = {t: commonest(c) for t, c in answers.items()}
    share = n_test / len(images)
    # a text can move when it has another answer; its test quota is its share of the test split
    quota = {t: max(1, round(share * sum(c.values()))) for t, c in answers.items() if len(c) > 1}
    minor_in_test: Counter = Counter()
    test: set[str] = set()
    remaining = set(images)
    for _ in range(n_test):
        best = max(remaining, key=lambda img: (_gains(by_image, usual, quota, minor_in_test, img), -rank[img]))
        test.add(best)
        remaining.discard(best)
        for t, a in by_image[best]:
            if t in quota and a != usual[t]:
                minor_in_test[t] += 1
    rest = sorted(remaining, key=rank.__getitem__)
    validation = set(rest[:n_validation])
    split_of = {img: "test" if img in test else "validation" if img in validation else "train" for img in images}
    return Resplit(split_of, *_moved(by_image, split_of))


def _moved(by_image: dict[str, list[tuple[str, str]]], split_of: dict[str, str]) -> tuple[int, int]:
    train, test = defaultdict(Counter), defaultdict(Counter)
    for img, pairs in by_image.items():
        side = {"train": train, "test": test}.get(split_of[img])
        if side is None:
            continue
        for t, a in pairs:
            side[t][a] += 1
    movable = [t for t in train if t in test and len(train[t] | test[t]) > 1]
    return sum(commonest(train[t]) != commonest(test[t]) for t in movable), len(movable)


def prior_conflicting(train: list[QA], test: list[QA]) -> list[bool]:
    """For each test question: keep it (True) unless its answer is the commonest training answer
    of its text while that text has another answer somewhere in ``train`` or ``test`` (a text
    with one answer everywhere is kept: nothing could move it)."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for qa in train:
        answers[text_key(qa.question)][text_key(qa.answer)] += 1
    seen: dict[str, set] = defaultdict(set)
    for qa in [*train, *test]:
        seen[text_key(qa.question)].add(text_key(qa.answer))
    keep = []
    for qa in test:
        t, c = text_key(qa.question), answers.get(text_key(qa.question))
        usual = commonest(c) if c else None
        keep.append(not (usual == text_key(qa.answer) and len(seen[t]) > 1))
    return keep
