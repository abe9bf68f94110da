"""A harder synthetic set where answer priors are useless (``convert_slake_dataset.py --demo hard``).

Each image is a chest or an abdomen with a left and a right organ (lungs or kidneys; left
and right as seen in the image). Each organ holds 0-2 findings of three kinds, told apart
only by their texture: *nodule* (checkerboard speckle), *cyst* (horizontal stripes),
*calcification* (vertical stripes). Distractors that are not findings (bright vessels,
flat dots) are drawn on every image. Questions are compositional (kind x side x organ,
counts, comparisons between the two sides), and every closed question text is answered
Yes and No equally often across images, so the per-question prior is about 50 %:

* "Is there a cyst in the left lung?"                       Yes / No, balanced per text
* "How many nodules are in the image?"                      0-4
* "How many findings are in the right kidney?"              0-2
* "What kind of finding is in the left lung?"               when the organ holds exactly one
* "Which lung has more findings, the left or the right?"    when the counts differ
* "Are there more findings in the left kidney than in the right kidney?"   Yes / No
* "What modality is used to take this image?", "Which part of the body ...?"

``write_hard_release`` writes the same release layout as the easy demo (dataset/demo.py).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from dataset.demo import BODY_LEVEL, MODALITIES, SIZE, _ellipse, write_release

KINDS = ["nodule", "cyst", "calcification"]
REGIONS = {"chest": ("Lung", "Chest", "lung"), "abdomen": ("Abdomen", "Abdomen", "kidney")}
SIDES = ["left", "right"]
# organ centre (y, x) and radii per region and side (left = left half of the image)
ORGAN = {("chest", "left"): (110, 70, 55, 34), ("chest", "right"): (110, 154, 55, 34),
         ("abdomen", "left"): (120, 72, 34, 24), ("abdomen", "right"): (120, 152, 34, 24)}


def sample_params(rng: random.Random) -> dict:
    region = rng.choice(list(REGIONS))
    findings = {side: [rng.choice(KINDS) for _ in range(rng.choice([0, 0, 1, 1, 2]))] for side in SIDES}
    return {"modality": rng.choice(MODALITIES), "region": region, "findings": findings,
            "noise_seed": rng.randrange(2**31)}


def _texture(kind: str, yy, xx) -> np.ndarray:
    if kind == "nodule":
        return np.where(((xx // 3) + (yy // 3)) % 2 == 0, 255.0, 0.0)
    if kind == "cyst":
        return np.where((yy // 3) % 2 == 0, 255.0, 10.0)
    return np.where((xx // 3) % 2 == 0, 255.0, 10.0)


def draw(params: dict) -> Image.Image:
    rng = np.random.default_rng(params["noise_seed"])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    mod, region = params["modality"], params["region"]
    img = np.full((SIZE, SIZE), 25.0 if mod == "MRI" else 0.0, np.float32)
    if mod == "X-Ray":
        img += 70 + 30 * yy / SIZE
    level = BODY_LEVEL[mod]
    body = _ellipse(yy, xx, 112, 112, 92 if region == "chest" else 84, 104)
    img[body] = level
    for side in SIDES:
        cy, cx, ry, rx = ORGAN[(region, side)]
        img[_ellipse(yy, xx, cy, cx, ry, rx)] = level * (0.35 if region == "chest" else 1.3)
    for _ in range(int(rng.integers(2, 5))):  # distractors: vessels and flat dots, never findings
        y0 = int(rng.integers(40, 180))
        img[y0:y0 + 2, int(rng.integers(30, 110)):int(rng.integers(120, 200))] = 235
        img[_ellipse(yy, xx, rng.integers(40, 190), rng.integers(40, 190), 4, 4)] = 200
    for side in SIDES:
        cy, cx, ry, rx = ORGAN[(region, side)]
        for (sy, sx), kind in zip(_slots(cy, cx, ry), params["findings"][side]):
            spot = _ellipse(yy, xx, sy + rng.integers(-3, 4), sx + rng.integers(-3, 4), 11, 11)
            img[spot] = _texture(kind, yy, xx)[spot]
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")


FINDING_BOX = 28  # a finding's spot: radius 11 around its slot, drawn up to 3 px off it


def boxes(params: dict) -> list[dict]:
    """The organ and finding boxes of an image, SLAKE's ``detection.json`` form: each organ
    ("Left Lung", "Right Kidney", ...; sides as seen in the image) and each finding ("Cyst", ...)."""
    out = []
    organ = REGIONS[params["region"]][2]
    for side in SIDES:
        cy, cx, ry, rx = ORGAN[(params["region"], side)]
        out.append({f"{side.capitalize()} {organ.capitalize()}": [cx - rx, cy - ry, 2 * rx, 2 * ry]})
        for (sy, sx), kind in zip(_slots(cy, cx, ry), params["findings"][side]):
            half = FINDING_BOX // 2
            out.append({kind.capitalize(): [sx - half, sy - half, FINDING_BOX, FINDING_BOX]})
    return out


def _slots(cy: int, cx: int, ry: int) -> list[tuple[int, int]]:
    return [(cy - ry // 2, cx), (cy + ry // 2, cx)]


def questions(params: dict, rng: random.Random) -> list[dict]:
    region, f = params["region"], params["findings"]
    organ = REGIONS[region][2]
    yes_no = (lambda b: "Yes" if b else "No")  # noqa: E731
    qs = [("What modality is used to take this image?", params["modality"], "OPEN", "Modality"),
          ("Which part of the body does this image belong to?", REGIONS[region][1], "OPEN", "Position")]
    combos = [(k, s) for k in KINDS for s in SIDES]
    present = [(k, s) for k, s in combos if k in f[s]]
    absent = [c for c in combos if c not in present]
    for _ in range(3):  # balanced per question text: draw the answer first, then a matching question
        pool = present if (rng.random() < 0.5 and present) or not absent else absent
        k, s = rng.choice(pool)
        qs.append((f"Is there a {k} in the {s} {organ}?", yes_no(k in f[s]), "CLOSED", "Abnormality"))
    k = rng.choice(KINDS)
    qs.append((f"How many {k}s are in the image?", str(sum(x == k for s in SIDES for x in f[s])), "OPEN", "Quantity"))
    s = rng.choice(SIDES)
    qs.append((f"How many findings are in the {s} {organ}?", str(len(f[s])), "OPEN", "Quantity"))
    singles = [s for s in SIDES if len(f[s]) == 1]
    if singles:
        s = rng.choice(singles)
        qs.append((f"What kind of finding is in the {s} {organ}?", f[s][0].capitalize(), "OPEN", "Abnormality"))
    if len(f["left"]) != len(f["right"]):
        more = "Left" if len(f["left"]) > len(f["right"]) else "Right"
        qs.append((f"Which {organ} has more findings, the left or the right?", more, "OPEN", "Position"))
        a, b = rng.sample(SIDES, 2)
        qs.append((f"Are there more findings in the {a} {organ} than in the {b} {organ}?",
                   yes_no(len(f[a]) > len(f[b])), "CLOSED", "Quantity"))
    return [{"question": q, "answer": a, "answer_type": t, "content_type": c} for q, a, t, c in qs]


PRIOR_SHARE = 0.8  # the "prior" variant: how often a closed text gets its usual answer


def usual_answer(kind: str, side: str, organ: str) -> str:
    """The answer a closed text of the "prior" variant usually has: fixed per text, Yes for
    half of the texts, so the text predicts the answer while the set stays balanced overall."""
    return "Yes" if (KINDS.index(kind) + SIDES.index(side) + (organ == "kidney")) % 2 == 0 else "No"


def questions_with_prior(params: dict, rng: random.Random) -> list[dict]:
    """The hard set's questions, except that each "Is there a <kind> in the <side> <organ>?"
    text gets its usual answer about PRIOR_SHARE of the time (as in real VQA sets, where
    the text alone answers most yes/no questions: 74 % in SLAKE English): the image still
    decides every answer, and the shortcut is there to be taken."""
    qs = [q for q in questions(params, rng) if not q["question"].startswith("Is there a ")]
    organ, f = REGIONS[params["region"]][2], params["findings"]
    asked = 0
    for _ in range(24):  # draw a text, then keep it only when its answer follows the prior's odds
        if asked == 3:
            break
        k, s = rng.choice(KINDS), rng.choice(SIDES)
        answer = "Yes" if k in f[s] else "No"
        usual = answer == usual_answer(k, s, organ)
        if rng.random() < (PRIOR_SHARE if usual else 1 - PRIOR_SHARE):
            qs.append({"question": f"Is there a {k} in the {s} {organ}?", "answer": answer,
                       "answer_type": "CLOSED", "content_type": "Abnormality"})
            asked += 1
    return qs


def write_hard_release(root: str | Path, seed: int = 0, n_train: int = 300, n_val: int = 40,
                       n_test: int = 60, prior: bool = False) -> Path:
    """The hard set in the release layout (PNG: JPEG would blur the 3-pixel textures);
    ``prior``: the variant whose closed texts mostly have their usual answer."""
    return write_release(root, seed, (n_train, n_val, n_test), sample_params, draw,
                         questions_with_prior if prior else questions, "hard{}/source.png",
                         lambda p: {"location": REGIONS[p["region"]][0], "modality": p["modality"]}, boxes)
