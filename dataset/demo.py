"""A built-in synthetic "mini-SLAKE" that needs no download.

Procedurally drawn CT-, MRI- and X-ray-like grayscale images of head, chest, abdomen and
pelvis, with 0-3 lesions on one side, small or large, and questions in SLAKE's phrasing
and content types whose answers follow from the drawing parameters alone. The visual
cues are coarse (intensity, layout, position, size, count) so even a frozen random
vision tower carries them and a small model trained on CPU learns to answer.

``write_demo_release`` writes the original release layout (imgs/xmlabN/source.jpg,
train.json, validate.json, test.json) so the demo runs through the real converter.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from infra.atomic import atomic_write_text

SIZE = 224
MODALITIES = ["CT", "MRI", "X-Ray"]
REGIONS = {  # SLAKE location value, body part answer, organ that the drawing contains
    "head": ("Brain", "Brain", "brain"),
    "chest": ("Lung", "Chest", "lung"),
    "abdomen": ("Abdomen", "Abdomen", "liver"),
    "pelvis": ("Pelvic Cavity", "Pelvic Cavity", "femoral head"),
}
ORGANS = [r[2] for r in REGIONS.values()]
BODY_LEVEL = {"CT": 105, "MRI": 175, "X-Ray": 215}
PLANE = {"CT": "Transverse Plane", "MRI": "Transverse Plane", "X-Ray": "Coronal Plane"}


def sample_params(rng: random.Random) -> dict:
    count = 0 if rng.random() < 0.5 else rng.randint(1, 3)
    return {"modality": rng.choice(MODALITIES), "region": rng.choice(list(REGIONS)),
            "lesions": count, "side": rng.choice(["Left", "Right"]) if count else None,
            "size": rng.choice(["Small", "Large"]) if count else None,
            "noise_seed": rng.randrange(2**31)}


# The "shifted-prior" trap: real scans are not aligned, the anatomy moves and changes size from image to
# image, so evidence is not at fixed pixels (a lever that compares an image with the mean of others must
# still find it). Each image's drawing is moved by up to SHIFT_MAX pixels and scaled by ZOOM about the
# centre; lesions stay on their side (x 70 / 154 of 224, at most 112 - 42 * 1.15 + 24 < 112).
SHIFT_MAX = 24
ZOOM = (0.85, 1.15)


def sample_shifted_params(rng: random.Random) -> dict:
    """The easy set's parameters, plus where the drawing sits in the image ("shift" [dy, dx],
    "zoom")."""
    params = sample_params(rng)
    params["shift"] = [rng.randint(-SHIFT_MAX, SHIFT_MAX), rng.randint(-SHIFT_MAX, SHIFT_MAX)]
    params["zoom"] = round(rng.uniform(*ZOOM), 3)
    return params


def _placed(params: dict, y: float, x: float) -> tuple[float, float]:
    """Where the drawing's point (y, x) lands in the image (``shift`` and ``zoom`` about the centre)."""
    dy, dx = params.get("shift", (0, 0))
    z, c = params.get("zoom", 1.0), SIZE / 2
    return (y - c) * z + c + dy, (x - c) * z + c + dx


def _place_image(params: dict, img: Image.Image, background: float) -> Image.Image:
    if "shift" not in params:
        return img
    dy, dx = params["shift"]
    z, c = params["zoom"], SIZE / 2  # PIL's affine maps each output pixel back to its input pixel
    return img.transform(img.size, Image.Transform.AFFINE, (1 / z, 0, c - (c + dx) / z, 0, 1 / z, c - (c + dy) / z),
                         resample=Image.Resampling.BILINEAR, fillcolor=int(background))


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


# The drawn organ of each region, (centre y, centre x, radius y, radius x) per ellipse: what ``draw``
# paints and ``boxes`` reports.
ORGAN_SHAPES = {"head": [(112, 112, 60, 55)], "chest": [(108, 67, 48, 30), (108, 157, 48, 30)],
                "abdomen": [(95, 75, 30, 38)], "pelvis": [(150, 62, 15, 15), (150, 162, 15, 15)]}


def lesion_spots(params: dict, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(centre y, centre x, radius) of each lesion; ``rng`` is the image's own generator, so the
    drawing and its boxes (``boxes`` re-creates it from the noise seed) agree to the pixel."""
    radius = 9 if params["size"] == "Small" else 18
    cx = 70 if params["side"] == "Left" else 154
    spots = []
    for i in range(params["lesions"]):
        cy = 62 + 50 * i + int(rng.integers(-3, 4))
        spots.append((cy, cx + int(rng.integers(-4, 5)), radius))
    return spots


def boxes(params: dict) -> list[dict]:
    """The drawn organ and lesions as SLAKE's ``detection.json`` ([{"Liver": [x, y, w, h]}, ...]):
    with them the quick start trains where to look (--look_loss) and its evaluation plays the
    pointing game, like real SLAKE. The prior traps stay without boxes (Learning III is about
    data that has none)."""
    organ = REGIONS[params["region"]][2].title()
    z = params.get("zoom", 1.0)

    def box(cy, cx, ry, rx):
        if "shift" not in params:
            return [cx - rx, cy - ry, 2 * rx, 2 * ry]
        y, x = _placed(params, cy - ry, cx - rx)
        return [round(x, 1), round(y, 1), round(2 * rx * z, 1), round(2 * ry * z, 1)]
    out = [{organ: box(*shape)} for shape in ORGAN_SHAPES[params["region"]]]
    return out + [{"Lesion": box(cy, cx, r, r)}
                  for cy, cx, r in lesion_spots(params, np.random.default_rng(params["noise_seed"]))]


def draw(params: dict) -> Image.Image:
    rng = np.random.default_rng(params["noise_seed"])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    mod, region = params["modality"], params["region"]
    img = np.zeros((SIZE, SIZE), np.float32)
    if mod == "MRI":
        img += 25
    elif mod == "X-Ray":
        img += 70 + 30 * yy / SIZE  # film background with a vertical exposure gradient
    body = {"head": (112, 112, 85, 80), "chest": (112, 112, 75, 102),
            "abdomen": (112, 112, 78, 98), "pelvis": (118, 112, 62, 104)}[region]
    inside = _ellipse(yy, xx, *body)
    level = BODY_LEVEL[mod]
    img[inside] = level
    rim = inside & ~_ellipse(yy, xx, body[0], body[1], body[2] - 6, body[3] - 6)
    img[rim] = {"CT": 245, "MRI": 60, "X-Ray": 250}[mod]  # bone rim bright on CT/X-ray, dark on MRI
    organ_level = {"chest": level * 0.35, "abdomen": min(level + 45, 255),
                   "pelvis": 250 if mod != "MRI" else 90, "head": level + (25 if mod == "MRI" else -20)}[region]
    for shape in ORGAN_SHAPES[region]:
        img[_ellipse(yy, xx, *shape)] = organ_level
    # Lesions are heterogeneous (a coarse speckle), as tumours often are; this also keeps
    # them distinct from flat bright bone or dark background under any vision tower.
    speckle = np.where(((xx // 3) + (yy // 3)) % 2 == 0, 255.0, 0.0)
    for cy, cx, radius in lesion_spots(params, rng):
        spot = _ellipse(yy, xx, cy, cx, radius, radius)
        img[spot] = speckle[spot]
    img += rng.normal(0, 4 if mod == "MRI" else 7, img.shape)
    background = float(np.median(img[0]))
    return _place_image(params, Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L"), background)


def questions(params: dict, rng: random.Random, yes_share: float = 0.5) -> list[dict]:
    """(question, answer, answer_type, content_type) for one image, SLAKE-style. ``yes_share``:
    how often each yes/no question text is answered Yes (0.5: the text tells nothing; the
    "prior" variant uses PRIOR_YES, as real sets do, where the text alone answers most)."""
    mod, loc = params["modality"], REGIONS[params["region"]]
    n, yes_no = params["lesions"], (lambda b: "Yes" if b else "No")
    asked_mod = mod if rng.random() < yes_share else rng.choice([m for m in MODALITIES if m != mod])
    asked_organ = loc[2] if rng.random() < yes_share else rng.choice([o for o in ORGANS if o != loc[2]])
    qs = [
        ("What modality is used to take this image?", mod, "OPEN", "Modality"),
        (f"Is this a {asked_mod} image?", yes_no(asked_mod == mod), "CLOSED", "Modality"),
        ("Which part of the body does this image belong to?", loc[1], "OPEN", "Position"),
        (f"Does the picture contain {asked_organ}?", yes_no(asked_organ == loc[2]), "CLOSED", "Organ"),
        ("What scanning plane does this image belong to?", PLANE[mod], "OPEN", "Plane"),
        ("How many lesions are in the image?", str(n), "OPEN", "Quantity"),
    ]
    skewed = yes_share != 0.5  # the plain set keeps its original draws (same questions per seed)
    draw = rng.random()
    if (draw < yes_share) == (n > 0) if skewed else draw < 0.5:  # skewed: the Yes variant, yes_share of the time
        qs.append(("Is this image abnormal?", yes_no(n > 0), "CLOSED", "Abnormality"))
    else:
        qs.append(("Is this image normal?", yes_no(n == 0), "CLOSED", "Abnormality"))
    if n:
        side = params["side"].lower()
        if skewed:
            asked_side = side if rng.random() < yes_share else {"left": "right", "right": "left"}[side]
        else:
            asked_side = rng.choice(["left", "right"])
        qs += [
            ("Where is the lesion located?", params["side"], "OPEN", "Position"),
            (f"Is the lesion on the {asked_side} side of the image?", yes_no(asked_side == side), "CLOSED", "Position"),
            ("How big is the lesion?", params["size"], "OPEN", "Size"),
        ]
        # sizes are Large or Small equally often: asking about small lesions less often skews the text
        large = params["size"] == "Large"
        if not skewed or large or rng.random() < (1 - yes_share) / yes_share:
            qs.append(("Is the lesion large?", yes_no(large), "CLOSED", "Size"))
    return [{"question": q, "answer": a, "answer_type": t, "content_type": c} for q, a, t, c in qs]


def write_release(root: str | Path, seed: int, counts: tuple[int, int, int], sample, draw_image, ask,
                  image_name: str, row_fields, boxes=None) -> Path:
    """The release layout (imgs/, train.json, validate.json, test.json) of a synthetic set, and
    ``demo_params.json`` (the drawing parameters of every image, so tests can re-derive each
    answer). ``sample(rng)``, ``draw_image(params)`` and ``ask(params, rng)`` define the set;
    ``image_name`` is formatted with the image number; ``row_fields(params)`` adds metadata;
    ``boxes(params)``, if given, writes each image folder's ``detection.json`` as SLAKE does
    (a list of one-key objects, ``[{"Cyst": [x, y, w, h]}, ...]`` in the image's pixels)."""
    root = Path(root)
    rng = random.Random(seed)
    qid, img_id = 0, 0
    params_by_image = {}
    for count, fname in zip(counts, ("train.json", "validate.json", "test.json")):
        rows = []
        for _ in range(count):
            img_id += 1
            params = sample(rng)
            name = image_name.format(img_id)
            path = root / "imgs" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_image(params).save(path, **({"quality": 95} if name.endswith(".jpg") else {}))
            params_by_image[name] = params
            if boxes is not None:
                atomic_write_text(path.parent / "detection.json", json.dumps(boxes(params)))
            for q in ask(params, rng):
                rows.append({"img_id": img_id, "img_name": name, "q_lang": "en", **row_fields(params), "qid": qid, **q})
                qid += 1
        atomic_write_text(root / fname, json.dumps(rows, indent=1))
    atomic_write_text(root / "demo_params.json", json.dumps(params_by_image, indent=1))
    return root


PRIOR_YES = 0.8  # the "prior" variant: each yes/no text is answered Yes this often

# The "attribute-prior" trap: yes/no questions name a value of an attribute that an open question
# of the same image also asks about, in several phrasings, some negated; every closed text has its
# own usual answer (Yes for some, No for others), given PRIOR_YES of the time. (attribute, phrasing,
# negated); {v} is the named value.
VERIFY_TEMPLATES = {
    "modality": [("Is this a {v} image?", False), ("Was this scan taken with {v}?", False),
                 ("Is this not a {v} image?", True)],
    "part": [("Is this an image of the {v}?", False), ("Does the image show the {v}?", False),
             ("Does the image not show the {v}?", True)],
    "lesion": [("Is there a lesion?", False), ("Does the image contain a lesion?", False),
               ("Is no lesion present?", True), ("Does the image not contain a lesion?", True)],
    "side": [("Is the lesion on the {v} side?", False), ("Is the lesion not on the {v} side?", True)],
    "size": [("Is the lesion {v}?", False), ("Is the lesion not {v}?", True)],
}


VERIFY_ODDS = 5.0  # how much likelier a text is drawn when the image gives it its usual answer


def _usual_answer(text: str) -> str:
    """Each closed text's usual answer, fixed by the text alone (the same for every seed)."""
    return "Yes" if sum(map(ord, text)) % 2 else "No"


def verify_questions(params: dict, rng: random.Random) -> list[dict]:
    """The open questions of the easy set, and one yes/no question per attribute the image has:
    a phrasing (some negated) and a named value (right or wrong), answered by the image. Among
    an attribute's texts, one whose answer for this image is its usual answer is drawn
    VERIFY_ODDS times as often as one whose answer is not, so each text mostly gets its usual
    answer (about PRIOR_YES of the time on the training split) while every answer stays possible."""
    n = params["lesions"]
    truth = {"modality": params["modality"], "part": REGIONS[params["region"]][1].lower(), "lesion": None,
             "side": (params["side"] or "").lower(), "size": (params["size"] or "").lower()}
    values = {"modality": MODALITIES, "part": [r[1].lower() for r in REGIONS.values()], "lesion": [None],
              "side": ["left", "right"], "size": ["small", "large"]}
    kind = {"modality": "Modality", "part": "Position", "lesion": "Abnormality", "side": "Position", "size": "Size"}
    qs = [q for q in questions(params, rng) if q["answer_type"] == "OPEN"]
    for attr, templates in VERIFY_TEMPLATES.items():
        if attr in ("side", "size") and not n:
            continue
        options, weights = [], []
        for template, negated in templates:
            for v in values[attr]:
                holds = n > 0 if attr == "lesion" else v == truth[attr]
                text, answer = template.format(v=v), "Yes" if holds != negated else "No"
                options.append((text, answer))
                weights.append(VERIFY_ODDS if answer == _usual_answer(text) else 1.0)
        text, answer = rng.choices(options, weights)[0]
        qs.append({"question": text, "answer": answer, "answer_type": "CLOSED", "content_type": kind[attr]})
    return qs


def write_demo_release(root: str | Path, seed: int = 0, n_train: int = 300, n_val: int = 40,
                       n_test: int = 60, prior: bool = False, attribute: bool = False, shifted: bool = False) -> Path:
    """The easy demo set in the release layout (see ``write_release``), with its organ and lesion
    boxes; ``prior``: the variant whose yes/no texts are answered Yes PRIOR_YES of the time (a
    language-prior trap); ``attribute``: the attribute-prior trap (``verify_questions``);
    ``shifted``: each image's drawing moved and scaled (``sample_shifted_params``; with ``prior``,
    the shifted-prior trap). The traps have no boxes."""
    ask = verify_questions if attribute else (lambda p, rng: questions(p, rng, PRIOR_YES)) if prior else questions
    sample = sample_shifted_params if shifted else sample_params
    return write_release(root, seed, (n_train, n_val, n_test), sample, draw, ask, "xmlab{}/source.jpg",
                         lambda p: {"location": REGIONS[p["region"]][0], "modality": p["modality"],
                                    "base_type": "vqa", "triple": ["vhead", "_", "_"]},
                         boxes=None if prior or attribute else boxes)
