"""SLAKE metrics as the literature reports them, and the baselines they are compared with.

Normalisation (before any comparison): lower-case, number words to digits, punctuation
to spaces, articles dropped, whitespace collapsed; answers in Chinese get rules of their own
(see ``normalize``).

* ``closed_accuracy`` / ``open_accuracy`` / ``overall_accuracy``: exact match after
  normalisation (the MEVF / PubMedCLIP protocol for SLAKE).
* ``open_recall``: mean share of ground-truth tokens present in the prediction
  (LLaVA-Med's "recall" on open questions).
* ``closed_accuracy_llava_med``: LLaVA-Med's closed-question rule, for comparison with
  published tables only: correct when the ground truth is a *substring* of the
  lower-cased prediction, so "no" counts as matching "none" or "not sure".
"""
from __future__ import annotations

from collections import Counter, defaultdict

from dataset.answers import is_chinese, normalize  # noqa: F401  (normalize and is_chinese: the metrics' own API too)

def exact_match(pred: str, gt: str) -> bool:
    return normalize(pred) == normalize(gt)


def _tokens(text: str) -> list[str]:
    """Words; for Chinese, characters (it has no word boundaries)."""
    norm = normalize(text)
    return list(norm) if is_chinese(norm) else norm.split()


def token_recall(pred: str, gt: str) -> float:
    gt_tokens = _tokens(gt)
    if not gt_tokens:
        return 0.0
    pred_tokens = set(_tokens(pred))
    return sum(t in pred_tokens for t in gt_tokens) / len(gt_tokens)


def llava_med_closed_hit(pred: str, gt: str) -> bool:
    return str(gt).lower().strip() in str(pred).lower()


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def compute_metrics(items: list[dict]) -> dict:
    """``items``: dicts with answer, prediction, answer_type, content_type, modality."""
    closed = [i for i in items if i["answer_type"] == "CLOSED"]
    opened = [i for i in items if i["answer_type"] == "OPEN"]
    hit = lambda i: exact_match(i["prediction"], i["answer"])  # noqa: E731

    def breakdown(key: str) -> dict:
        groups = defaultdict(list)
        for i in items:
            groups[i.get(key) or "unknown"].append(i)
        return {k: {"count": len(v), "accuracy": _mean(map(hit, v)),
                    "closed_count": sum(i["answer_type"] == "CLOSED" for i in v),
                    "closed_accuracy": _mean(hit(i) for i in v if i["answer_type"] == "CLOSED"),
                    "open_accuracy": _mean(hit(i) for i in v if i["answer_type"] == "OPEN")}
                for k, v in sorted(groups.items())}

    return {
        "count": {"all": len(items), "closed": len(closed), "open": len(opened)},
        "closed_accuracy": _mean(map(hit, closed)),
        "open_accuracy": _mean(map(hit, opened)),
        "open_recall": _mean(token_recall(i["prediction"], i["answer"]) for i in opened),
        "overall_accuracy": _mean(map(hit, items)),
        "closed_accuracy_llava_med": _mean(llava_med_closed_hit(i["prediction"], i["answer"]) for i in closed),
        "by_content_type": breakdown("content_type"),
        "by_modality": breakdown("modality"),
        **({"by_source": breakdown("source")} if any(i.get("source") for i in items) else {}),
    }


def _most_common(answers: list[str]) -> str:
    # ties broken alphabetically so the baseline does not depend on file order
    counts = Counter(answers)
    return min(counts, key=lambda a: (-counts[a], a))


def baselines(train: list[dict], test: list[dict]) -> dict:
    """Answer-prior baselines from the training split: the majority answer per answer type,
    and the majority answer for the identical question text (falling back to the type's
    majority for questions never seen in training). A model has to beat both to show
    that it uses the image."""
    by_type = defaultdict(list)
    by_question = defaultdict(list)
    for r in train:
        ans = normalize(r["answer"])
        by_type[r["answer_type"]].append(ans)
        by_question[(r["answer_type"], normalize(r["question"]))].append(ans)
    type_major = {t: _most_common(a) for t, a in by_type.items()}
    question_major = {q: _most_common(a) for q, a in by_question.items()}
    out = {}
    for name, predict in (
            ("majority_per_answer_type", lambda r: type_major.get(r["answer_type"], "")),
            ("majority_per_question", lambda r: question_major.get(
                (r["answer_type"], normalize(r["question"])), type_major.get(r["answer_type"], "")))):
        m = compute_metrics([{**r, "prediction": predict(r)} for r in test])
        out[name] = {k: m[k] for k in ("closed_accuracy", "open_accuracy", "open_recall", "overall_accuracy")}
    return out


def image_use(train: list[dict], test: list[dict]) -> dict:
    """Does the model look at the image? Two measures a score can hide:

    * ``against_prior``: accuracy on the test questions whose answer differs from the training
      split's majority answer for the same question text. A model that answers from the
      question alone scores about 0 here, whatever its overall accuracy.
    * ``varies_with_image``: among question texts asked about several test images whose answers
      differ, the share where the model's answer changes too (a prior-only model: 0).
    """
    by_question = defaultdict(list)
    for r in train:
        by_question[(r["answer_type"], normalize(r["question"]))].append(normalize(r["answer"]))
    prior = {q: _most_common(a) for q, a in by_question.items()}
    hit = lambda i: exact_match(i["prediction"], i["answer"])  # noqa: E731
    out = {}
    for kind, rows in (("closed", [i for i in test if i["answer_type"] == "CLOSED"]),
                       ("open", [i for i in test if i["answer_type"] == "OPEN"]), ("all", test)):
        against = [i for i in rows if (key := (i["answer_type"], normalize(i["question"]))) in prior
                   and normalize(i["answer"]) != prior[key]]
        groups = defaultdict(list)
        for i in rows:
            groups[(i["answer_type"], normalize(i["question"]))].append(i)
        informative = [g for g in groups.values() if len({normalize(i["answer"]) for i in g}) > 1]
        out[kind] = {"against_prior_count": len(against), "against_prior_accuracy": _mean(map(hit, against)),
                     "questions_with_varying_answers": len(informative),
                     "varies_with_image": _mean(len({normalize(i["prediction"]) for i in g}) > 1
                                                for g in informative)}
    return out


def image_use_verdict(m: dict) -> str:
    """One line for the printed table: is the score earned by looking at the image?"""
    use = m.get("image_use")
    if not use:
        return "image use: not measured (no training file for the priors)"
    parts, blind, why = [], [], []
    for kind in ("closed", "open"):
        u = use[kind]
        if u["against_prior_count"] == 0:
            continue
        acc, var = u["against_prior_accuracy"] or 0.0, u["varies_with_image"]
        parts.append(f"{kind} {100 * acc:.1f}% against the prior (n={u['against_prior_count']})"
                     + (f", answer changes with the image for {100 * var:.0f}% of repeated questions"
                        if var is not None else ""))
        if var is not None and var < 0.05:  # decides first: a fixed answer per text can still be "right" by luck
            blind.append(kind)
            why.append(f"a {kind} question asked about several images gets the same answer whatever the image, so "
                       f"its {100 * acc:.0f}% against the prior is one fixed answer per text, not reading")
        elif acc < 0.05:
            blind.append(kind)
            why.append(f"{kind} questions whose answer is not the usual one for their text are almost never right")
    verdict = (f"NOT USING THE IMAGE for {' and '.join(blind)} questions: they are answered from the question "
               f"text alone ({'; '.join(why)})" if blind else "the answers depend on the image")
    return "image use: " + "; ".join(parts) + f" -> {verdict}"
