"""Test-split evaluation (batched, cached features): predictions, metrics beside the answer-prior
baselines, calibration, the pointing game and overlays. Single questions: evaluation/inference.py."""
from __future__ import annotations

import json
import logging
import re
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from dataset.boxes import BOXES_FILE, BoxError, grid_side, image_keys, look_mask, patch_targets, pointing_group, read_boxes_file
from dataset.contract import DataError, answer_of, image_file, images_of, question_of, read_answers, read_jsonl
from dataset.features import FeatureStore
from dataset.images import ImageReadError, load_image
from evaluation.metrics import baselines, compute_metrics, exact_match, image_use, image_use_verdict, normalize
from infra.atomic import atomic_open, atomic_write_text, remove_stale_temps
from model.checkpoint import LoadedCheckpoint
from model.constrain import build_answer_trie
from evaluation.explain import answer_sets, score_answers
from evaluation.inference import generation_autocast
from evaluation.plots import plot_baselines, plot_reliability
from evaluation.relevance import DEFAULT_RELEVANCE, METHODS as RELEVANCE_METHODS, model_view, overlay, relevance_maps
from model.generation import GenerationConfig, generate
from infra.runtime import progress
from evaluation.scoring import ABSTAIN_THRESHOLDS, abstention, calibration, candidate_log_likelihoods
from model.tokenization import ChatEncoder, answer_ids

log = logging.getLogger("eval")


def evaluate_split(ckpt: LoadedCheckpoint, data_path: Path, images_path: Path, train_path: Path | None,
                   out_dir: Path, device: torch.device, batch_size: int = 64, max_new_tokens: int = 32,
                   cache_dir: Path | None = None, feature_cache_gb: float = 4.0, constrain: str = "none",
                   relevance: str = DEFAULT_RELEVANCE, overlays: int = 0, abstain_below: float | None = None,
                   explain_answers: bool = False) -> dict:
    """Writes predictions.jsonl and metrics.json. ``constrain`` closed|all: a second pass with
    answer-constrained decoding (model/constrain.py), reported beside the free one.
    ``relevance``: the relevance-map method of the pointing game ('all' scores every method);
    ``overlays``: how many questions get an overlay PNG of that map in ``out_dir/overlays``;
    ``abstain_below``: one more coverage/accuracy row for closed answers withheld below it;
    ``explain_answers``: every prediction gets its probability and top alternatives
    (evaluation.explain.score_answers, batched; closed questions reuse the calibration's scores)."""
    model, tok = ckpt.model, ckpt.tokenizer
    records = read_jsonl(data_path, require_vqa=True,
                         hint="run `python convert_slake_dataset.py` first, or pass --data_path")
    rec_paths = [[image_file(images_path, rel, f"{data_path}:{n}") for rel in images_of(rec)]
                 for n, rec in enumerate(records, 1)]
    image_paths, image_index, failures = _readable_images(rec_paths)
    features = FeatureStore(model.vision_tower, image_paths, device, cache_dir, feature_cache_gb)
    items, pending = _questions(records, rec_paths, ChatEncoder(tok, model.config.image_tokens), image_index,
                                failures)
    if failures:
        log.warning("%d image(s) could not be read; their %d question(s) count as wrong, e.g. %s",
                    len(failures), sum(i["error"] is not None for i in items), next(iter(failures.values())))

    # the training split (baselines, answer sets) is read and the answer sets built before any generation,
    # so a bad --train_path or --constrain stops the run at once, not after the unconstrained pass
    train, trie = _train_split(train_path, constrain, tok, model.config.eos_token_id)
    pending.sort(key=lambda x: len(x[1]))  # similar lengths together: less padding
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    for i, text in _generate_all(model, tok, pending, features, gen_cfg, batch_size, device).items():
        items[i]["prediction"] = text
    seconds = time.perf_counter() - t0

    metrics = compute_metrics(items)
    metrics["unreadable_images"] = len(failures)
    metrics["generation_seconds"] = round(seconds, 3)
    metrics["baselines"] = {}
    if train is not None:
        metrics["baselines"] = baselines(train, items)
        metrics["image_use"] = image_use(train, items)
    else:
        log.warning("no training file at %s: baselines skipped", train_path)
    if trie is not None:
        types = {i: items[i]["answer_type"] for i, _, _ in pending}
        constrained = _generate_all(model, tok, pending, features, gen_cfg, batch_size, device, trie, types)
        c_items = [dict(it, prediction=constrained.get(n, "")) for n, it in enumerate(items)]
        for n, it in enumerate(items):
            it["prediction_constrained"] = c_items[n]["prediction"]
        cm = compute_metrics(c_items)
        metrics["constrained"] = {"mode": constrain, **{k: cm[k] for k in (
            "closed_accuracy", "open_accuracy", "open_recall", "overall_accuracy")}}
    if train is not None:
        calib = closed_confidence(model, tok, train, items, pending, features, batch_size, abstain_below)
        if calib:
            metrics["calibration"] = calib
    if explain_answers:
        t1 = time.perf_counter()
        explain_predictions(model, tok, items, pending, features, answer_sets(train) if train is not None else None)
        metrics["explain_seconds"] = round(time.perf_counter() - t1, 3)
    methods = RELEVANCE_METHODS if relevance == "all" else (relevance,)
    if relevance == "all":  # the chosen default first: it stays the headline number
        methods = (DEFAULT_RELEVANCE,) + tuple(m for m in methods if m != DEFAULT_RELEVANCE)
    pointing = pointing_game(model, tok, items, records, rec_paths, pending, features, images_path, data_path,
                             batch_size, methods)
    if pointing:
        metrics["pointing"] = pointing
    if overlays:
        metrics["overlays"] = write_overlays(model, tok, items, pending, features, image_paths,
                                             out_dir / "overlays", overlays, methods[0])
    metrics.update(checkpoint=str(ckpt.path), stage=ckpt.stage, data=str(data_path), images=str(images_path))
    write_predictions(out_dir, items)
    if metrics.get("calibration"):
        remove_stale_temps(out_dir / "reliability.png")
        plot_reliability(metrics["calibration"], out_dir / "reliability.png")
    remove_stale_temps(out_dir / "baselines.png")
    if plot_baselines(metrics, out_dir / "baselines.png"):
        metrics["baselines_chart"] = str(out_dir / "baselines.png")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _readable_images(rec_paths: list[list[Path]]) -> tuple[list[Path], dict[Path, int], dict[Path, str]]:
    """(the readable images in first-seen order, their row in that table, why each other one is
    unreadable). Images that cannot be read count as failures in the report instead of stopping."""
    image_paths, image_index, failures = [], {}, {}
    for paths in rec_paths:
        for p in paths:
            if p in image_index or p in failures:
                continue
            try:
                load_image(p)
                image_index[p] = len(image_paths)
                image_paths.append(p)
            except ImageReadError as exc:
                failures[p] = str(exc)
    return image_paths, image_index, failures


def _questions(records: list[dict], rec_paths, encoder: ChatEncoder, image_index: dict, failures: dict):
    """(items: one result row per question, pending: (item index, prompt ids, image rows) for those
    whose images could all be read)."""
    items, pending = [], []
    for n, (rec, paths) in enumerate(zip(records, rec_paths)):
        item = {"qid": rec.get("qid", n), "question": question_of(rec), "answer": answer_of(rec),
                "answer_type": rec["answer_type"], "content_type": rec.get("content_type"),
                "modality": rec.get("modality"), "source": rec.get("source") or "slake", "prediction": "",
                "error": None}
        bad = [failures[p] for p in paths if p in failures]
        if bad:
            item["error"] = bad[0]
        else:
            prompt = encoder.encode(rec["conversations"][:-1], add_generation_prompt=True).input_ids
            pending.append((len(items), prompt, [image_index[p] for p in paths]))
        items.append(item)
    return items, pending


def _train_split(train_path: Path | None, constrain: str, tok, eos_id: int):
    """(the training split's questions or None, the answer trie for --constrain or None)."""
    train, trie = None, None
    if train_path is not None and train_path.is_file():
        train = read_answers(train_path)
    if constrain != "none":
        if train is None:
            raise FileNotFoundError(f"--constrain {constrain} takes its answer sets from the training split: "
                                    f"{train_path} not found (pass --train_path)")
        try:
            trie = build_answer_trie(tok, [(r["answer"], r["answer_type"]) for r in train], eos_id, constrain)
        except ValueError as exc:
            raise DataError(f"--constrain {constrain} with {train_path}: {exc}") from None
    return train, trie


def explain_predictions(model, tok, items: list[dict], pending, features, sets, step: int = 32):
    """Gives every single-image prediction its probability and top 3 alternatives: closed ones
    from the calibration's candidate scores, the rest by batched scoring passes."""
    todo = []
    for i, prompt, imgs in pending:
        if len(imgs) != 1:
            continue
        scored = items[i].get("answer_probs", {})  # closed: already scored over the set (calibration)
        mine = next((a for a in scored if normalize(a) == normalize(items[i]["prediction"])), None)
        if mine is not None:
            alts = sorted(((a, q) for a, q in scored.items() if a != mine), key=lambda x: -x[1])
            items[i].update(probability=scored[mine], alternatives=[[a, q] for a, q in alts[:3]],
                            scored_over="candidates")
        else:
            todo.append((i, prompt, imgs[0]))
    with generation_autocast(features.device):
        for start in progress(range(0, len(todo), step), desc="scoring answers", unit="batch"):
            chunk = todo[start:start + step]
            found = score_answers(model, tok, [p for _, p, _ in chunk],
                                  features.get(torch.tensor([j for _, _, j in chunk])),
                                  [items[i]["prediction"] for i, _, _ in chunk],
                                  [items[i]["answer_type"] for i, _, _ in chunk], sets)
            for (i, _, _), (p, alts, over) in zip(chunk, found):
                items[i].update(probability=round(p, 6), alternatives=[[a, round(q, 6)] for a, q in alts[:3]],
                                scored_over=over)


def write_predictions(out_dir: Path, items: list[dict]):
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("predictions.jsonl", "metrics.json"):
        remove_stale_temps(out_dir / name)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(
        {"qid": i["qid"], "question": i["question"], "answer": i["answer"], "prediction": i["prediction"],
         "correct": exact_match(i["prediction"], i["answer"]), "answer_type": i["answer_type"],
         "content_type": i["content_type"], "modality": i["modality"],
         **({"prediction_constrained": i["prediction_constrained"],
             "correct_constrained": exact_match(i["prediction_constrained"], i["answer"])}
            if "prediction_constrained" in i else {}),
         **({"answer_probs": i["answer_probs"]} if "answer_probs" in i else {}),
         **({k: i[k] for k in ("probability", "alternatives", "scored_over")} if "probability" in i else {}),
         **({"error": i["error"]} if i["error"] else {})}) + "\n" for i in items))


MAX_CANDIDATES = 8  # closed answer sets larger than this are not scored (SLAKE's is Yes / No)


def closed_confidence(model, tok, train: list[dict], items: list[dict], pending, features, batch_size: int,
                      abstain_below: float | None = None) -> dict:
    """Scores every closed test question's candidate answers (the training split's closed
    answers) in batched teacher-forced passes (evaluation.scoring): each item gets ``answer_probs``,
    and the returned metrics hold the candidates' accuracy, ECE, Brier score, the reliability
    table and accuracy at coverage. {} when there is no closed answer set to score."""
    counts: dict[str, dict[str, int]] = {}
    for r in train:
        if r["answer_type"] == "CLOSED":
            forms = counts.setdefault(normalize(r["answer"]), {})
            forms[r["answer"]] = forms.get(r["answer"], 0) + 1
    if not 2 <= len(counts) <= MAX_CANDIDATES:
        return {}
    shown = sorted((max(f, key=lambda a: (f[a], a)) for f in counts.values()), key=lambda a: normalize(a))
    cands = [answer_ids(tok, a, model.config.eos_token_id) for a in shown]
    closed = [entry for entry in pending if items[entry[0]]["answer_type"] == "CLOSED" and len(entry[2]) == 1]
    if not closed:
        return {}
    probs, correct = [], []
    step = max(1, batch_size // len(cands))
    amp = generation_autocast(features.device)
    for start in range(0, len(closed), step):
        chunk = closed[start:start + step]
        index = torch.tensor([imgs[0] for _, _, imgs in chunk], dtype=torch.long)
        with amp:
            ll = candidate_log_likelihoods(model, [p for _, p, _ in chunk], features.get(index), cands)
        p = torch.softmax(ll, dim=-1).cpu()
        for (i, _, _), row in zip(chunk, p.tolist()):
            items[i]["answer_probs"] = {a: round(x, 6) for a, x in zip(shown, row)}
            best = max(range(len(shown)), key=lambda j: row[j])
            probs.append(row[best])
            correct.append(normalize(shown[best]) == normalize(items[i]["answer"]))
    thresholds = ABSTAIN_THRESHOLDS + ((abstain_below,) if abstain_below is not None else ())
    return {"candidates": shown, **calibration(probs, correct, thresholds=thresholds),
            **({"abstain_below": abstention(probs, correct, abstain_below)} if abstain_below is not None else {})}


def pointing_game(model, tok, items, records, rec_paths, pending, features, images_path: Path, data_path: Path,
                  batch_size: int, methods: tuple[str, ...] = (DEFAULT_RELEVANCE,)) -> dict | None:
    """Where the model looks, checked against the dataset's own boxes (medical_boxes.json beside
    the questions): for each question that names an organ or finding boxed in its image, a hit
    when the answer's relevance map (evaluation.relevance, ``methods[0]``; every method of
    ``methods`` is scored) peaks where the question points (dataset.boxes.look_mask). Beside it
    two maps that do not look: uniform (the expected hit rate of a random patch) and the image
    centre; and the same per question group (dataset.boxes.pointing_group: kind x side, side,
    kind). The gradient methods explain the model's own (greedy) answer."""
    try:
        table = read_boxes_file(data_path.parent / BOXES_FILE)
    except BoxError as exc:  # the boxes are extra: the answers' metrics stand without them
        log.warning("warning: no pointing game: %s", exc)
        return None
    grid = grid_side(model.config.image_tokens)
    if not table or grid is None:
        return None
    chosen = [(entry, image_keys(rec_paths[entry[0]], images_path)[0]) for entry in pending
              if len(rec_paths[entry[0]]) == 1]  # (pending entry, its image's key in the boxes file)
    keys = {key: n for n, key in enumerate(dict.fromkeys(key for _, key in chosen))}
    names = sorted({n for k in keys for n in table.get(k, {}).get("boxes", {})})
    if not names:
        return None
    _, targets, known = patch_targets(table, list(keys), grid, names)
    work = []
    for entry, key in chosen:
        if known[keys[key]]:
            text = question_of(records[entry[0]])
            mask = look_mask(text, names, targets[keys[key]])
            if mask is not None:
                work.append((entry, mask, pointing_group(text, names)))
    if not work:
        return None
    centre = (grid // 2) * grid + grid // 2
    answers = [answer_ids(tok, items[i]["prediction"], model.config.eos_token_id) for (i, _, _), _, _ in work]
    rates = {}
    for method in methods:
        hits = []
        for start in range(0, len(work), batch_size):
            chunk = work[start:start + batch_size]
            index = torch.tensor([j for (_, _, imgs), _, _ in chunk for j in imgs], dtype=torch.long)
            with generation_autocast(features.device):
                maps = relevance_maps(model, [p for (_, p, _), _, _ in chunk], features.get(index), method,
                                      answers[start:start + batch_size])
            top = maps.argmax(-1).cpu()
            hits += [bool(mask[t]) for (_, mask, _), t in zip(chunk, top.tolist())]
        rates[method] = hits

    def score(members: list[int], method: str) -> dict:
        return {"count": len(members), "hit_rate": sum(rates[method][j] for j in members) / len(members),
                "uniform": sum(float(work[j][1].float().mean()) for j in members) / len(members),
                "centre": sum(bool(work[j][1][centre]) for j in members) / len(members)}
    everyone = list(range(len(work)))
    groups = {}
    for j, (_, _, group) in enumerate(work):
        groups.setdefault(group, []).append(j)
    out = {"method": methods[0], **score(everyone, methods[0]),
           "by_group": {g: score(m, methods[0]) for g, m in sorted(groups.items())}}
    if len(methods) > 1:
        out["methods"] = {m: {"hit_rate": score(everyone, m)["hit_rate"],
                              "by_group": {g: score(mm, m)["hit_rate"] for g, mm in sorted(groups.items())}}
                          for m in methods}
    return out


def write_overlays(model, tok, items, pending, features, image_paths: list[Path], folder: Path, n: int,
                   method: str) -> int:
    """Overlays of the answer's relevance map on the scan (as the tower sees it) for ``n``
    questions spread evenly over the test split: ``<folder>/<qid>.png``, titled with the
    question, the answer and the expected answer. Returns how many were written."""
    single = [entry for entry in pending if len(entry[2]) == 1]
    if n <= 0 or not single:
        return 0
    picked = [single[j] for j in sorted({round(k * (len(single) - 1) / max(n - 1, 1)) for k in range(min(n, len(single)))})]
    folder.mkdir(parents=True, exist_ok=True)
    for i, prompt, imgs in picked:
        answer = answer_ids(tok, items[i]["prediction"], model.config.eos_token_id)
        with generation_autocast(features.device):
            rel = relevance_maps(model, [prompt], features.get(torch.tensor(imgs)), method, [answer])[0].cpu()
        view = overlay(model_view(model.vision_tower, load_image(image_paths[imgs[0]])), rel)
        caption = f"{items[i]['question']}\nanswer: {items[i]['prediction'] or '(none)'} | expected: {items[i]['answer']}"
        with atomic_open(folder / f"{_safe_name(items[i]['qid'])}.png", "wb") as f:
            captioned(with_scale(view), caption).save(f, format="PNG")
    return len(picked)


def _safe_name(qid) -> str:
    return re.sub(r"[^\w.-]", "_", str(qid))[:80] or "question"


def captioned(image: Image.Image, text: str, width: int = 448) -> Image.Image:
    """The image scaled to ``width`` with ``text`` (wrapped) on a white band below it."""
    scaled = image.resize((width, round(image.height * width / image.width)), Image.BILINEAR)
    lines = [chunk for line in text.splitlines() for chunk in textwrap.wrap(line, 60) or [""]]
    band = 16 * len(lines) + 8
    out = Image.new("RGB", (width, scaled.height + band), "white")
    out.paste(scaled, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, line in enumerate(lines):
        draw.text((6, scaled.height + 4 + 16 * k), line, fill="black")
    return out


def with_scale(image: Image.Image, height: int = 22) -> Image.Image:
    """An overlay with its colour scale below it: clear (looked at least) to full red (most)."""
    out = Image.new("RGB", (image.width, image.height + height), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    left, right, top = 70, image.width - 70, image.height + 5
    for x in range(left, right):  # the overlay's own mix: grey scan below, red on top at up to 0.6
        a = 0.6 * (x - left) / max(right - left - 1, 1)
        draw.line([(x, top), (x, top + 10)], fill=(round(128 * (1 - a) + 255 * a), round(128 * (1 - a)),
                                                   round(128 * (1 - a))))
    draw.text((4, top - 1), "looked least", fill="black")
    draw.text((right + 4, top - 1), "most", fill="black")
    return out


def _generate_all(model, tok, pending, features, gen_cfg, batch_size, device, trie=None,
                  types: dict | None = None) -> dict[int, str]:
    """Greedy answers for every pending (item index, prompt, image rows), batched."""
    out = {}
    amp = generation_autocast(device)
    desc = "evaluating" + (" (constrained)" if trie is not None else "")
    for start in progress(range(0, len(pending), batch_size), desc=desc, unit="batch"):
        chunk = pending[start:start + batch_size]
        index = torch.tensor([j for _, _, imgs in chunk for j in imgs], dtype=torch.long)
        with amp:
            ids = generate(model, [p for _, p, _ in chunk], features.get(index), gen_cfg,
                           model.config.eos_token_id, model.config.pad_token_id, trie=trie,
                           answer_sets=[types[i] for i, _, _ in chunk] if trie is not None else None)
        for (i, _, _), row in zip(chunk, ids):
            out[i] = tok.decode(row, skip_special_tokens=True).strip()
    return out


def _pct(x) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def format_table(m: dict) -> str:
    rows = [("model", m)]
    if m.get("constrained"):
        rows.append((f"model, constrained ({m['constrained']['mode']})", m["constrained"]))
    rows += [(k.replace("_", " "), v) for k, v in m.get("baselines", {}).items()]
    lines = [f"{'':30s} {'closed':>7s} {'open':>7s} {'open rec':>8s} {'overall':>8s}"]
    for name, r in rows:
        lines.append(f"{name:30s} {_pct(r['closed_accuracy']):>7s} {_pct(r['open_accuracy']):>7s} "
                     f"{_pct(r['open_recall']):>8s} {_pct(r['overall_accuracy']):>8s}")
    c = m["count"]
    lines.append(f"questions: {c['all']} ({c['closed']} closed, {c['open']} open); "
                 f"LLaVA-Med closed rule (substring): {_pct(m['closed_accuracy_llava_med']).strip()}")
    lines.append("by content type: " + ", ".join(f"{k} {_pct(v['accuracy']).strip()} (n={v['count']})"
                                                 for k, v in m["by_content_type"].items()))
    lines.append("by modality:     " + ", ".join(f"{k} {_pct(v['accuracy']).strip()} (n={v['count']})"
                                                 for k, v in m["by_modality"].items()))
    lines.append(image_use_verdict(m))
    if m.get("calibration"):
        c = m["calibration"]
        lines.append(f"confidence (closed, {'/'.join(c['candidates'])} scored): accuracy "
                     f"{_pct(c['accuracy']).strip()}, calibration error {_pct(c['ece']).strip()}, Brier {c['brier']:.3f}; "
                     f"on the 50 % it is surest of: {_pct(c['accuracy_at_coverage']['50%']).strip()} "
                     "(reliability.png)")
    if m.get("calibration", {}).get("abstain_below"):
        a = m["calibration"]["abstain_below"]
        lines.append(f"answering 'not sure' below {a['threshold']:g}: {_pct(a['coverage']).strip()} of the closed "
                     f"questions answered, {_pct(a['accuracy']).strip()} of those right")
    if m.get("pointing"):
        p = m["pointing"]
        lines.append(f"where it looked ({p['method']}): for {p['count']} questions that name a boxed organ or finding, "
                     f"the answer's relevance map peaks inside it {_pct(p['hit_rate']).strip()} of the time (a uniform "
                     f"map: {_pct(p['uniform']).strip()}, the image centre: {_pct(p['centre']).strip()}); by question: "
                     + ", ".join(f"{g} {_pct(r['hit_rate']).strip()} (uniform {_pct(r['uniform']).strip()}, n={r['count']})"
                                 for g, r in p["by_group"].items()))
        for method, r in p.get("methods", {}).items():
            lines.append(f"  {method:13s} {_pct(r['hit_rate'])} " + ", ".join(
                f"{g} {_pct(v).strip()}" for g, v in r["by_group"].items()))
    if m.get("overlays"):
        lines.append(f"overlays of where it looked: {m['overlays']} PNG(s) in overlays/")
    return "\n".join(lines)
