"""Learning II (issue #22): boxes, the box questions and the look loss that make closed
questions use the image, each tested on its mechanism (the levers that lost their
measurements, film projector, patch loss, debiased and ranking losses, paired batches, were
removed; docs/learning.md has their numbers)."""
from __future__ import annotations

import io
import json
import zipfile
from collections import Counter

import pytest
import torch

from dataset.boxes import BoxError, parse_detection, patch_targets
from dataset.vqa_dataset import VQADataset, collate

from model.tokenization import IGNORE_INDEX, ChatEncoder
from tests.helpers import make_tiny_model, random_image
from trainer.config import parse_train_args


def _write(tmp_path, rows, name="d.jsonl"):
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(4):
        random_image(i).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / name).write_text("".join(json.dumps({
        "conversations": [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}],
        "image": f"{i % 4}.png", "answer_type": t}) + "\n" for i, (q, a, t) in enumerate(rows)))
    return tmp_path / name


ROWS = [("Is there a cyst?", "Yes", "CLOSED")] * 6 + [("Is there a cyst?", "No", "CLOSED")] * 2 + \
       [("Is this a CT?", "Yes", "CLOSED")] * 3 + [("How many cysts?", "2", "OPEN")] * 5


@pytest.mark.parametrize("argv", [["--projector", "film"], ["--patch_loss", "1"], ["--debias", "1"],
                                  ["--pair_closed"], ["--balance_closed"], ["--rank_weight", "1"],
                                  ["--look_contrast", "contrast"], ["--look_contrast", "all"],
                                  ["--look_contrast", "nearest"]])
def test_removed_levers_are_unknown_flags(argv, capsys):
    """Levers that lost their measurements are gone (docs/learning.md keeps their numbers)."""
    with pytest.raises(SystemExit) as exc:
        parse_train_args("sft", argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and ("invalid choice" in err or "unrecognized arguments" in err)


# ------------------------------------------------------------------ boxes

@pytest.mark.parametrize("text, expected", [
    ('[{"Liver": [1, 2, 3, 4]}, {"Cyst": [5, 6, 7, 8]}, {"Cyst": [0, 0, 2, 2]}]',
     {"Liver": [[1, 2, 3, 4]], "Cyst": [[5, 6, 7, 8], [0, 0, 2, 2]]}),
    ('{"Liver": [1, 2, 3, 4], "Lung": [[0, 0, 5, 5], [9, 9, 1, 1]]}',
     {"Liver": [[1, 2, 3, 4]], "Lung": [[0, 0, 5, 5], [9, 9, 1, 1]]}),
    ('[]', {}),
])
def test_detection_files_in_both_layouts(text, expected):
    assert parse_detection(text) == expected


@pytest.mark.parametrize("text", ['{"Liver": [1, 2, 3]}', '[{"Liver": "x"}]', '[5]', '"box"', '{not json',
                                  '{"Liver": [1, 2, 0, 4]}', '{"": [1, 2, 3, 4]}', '{"Liver": [1, 2, NaN, 4]}',
                                  '{"Liver": [true, 2, 3, 4]}'])
def test_malformed_detection_files_are_refused(text):
    with pytest.raises(BoxError):
        parse_detection(text)


def test_patch_targets_follow_resize_and_centre_crop():
    # a 448 x 224 image: resized to 448 x 224 -> 224 after a centre crop of x in [112, 336)
    table = {"a.png": {"size": [448, 224], "boxes": {"Left": [[112, 0, 112, 224]], "Out": [[0, 0, 100, 224]]}},
             "b.png": {"size": [224, 224], "boxes": {"Top": [[0, 0, 224, 16]]}}}
    classes, t, known = patch_targets(table, ["a.png", "b.png", "none.png"], grid=14)
    assert classes == ["Left", "Out", "Top"] and known.tolist() == [True, True, False]
    a = t[0].view(14, 14, 3)
    assert a[:, :7, 0].all() and not a[:, 7:, 0].any()  # the left half of the crop
    assert not a[..., 1].any()  # cropped away
    b = t[1].view(14, 14, 3)
    assert b[0, :, 2].all() and not b[1:, :, 2].any()
    assert not t[2].any()


def test_converter_keeps_boxes_from_folder_and_zip_and_warns_on_bad_ones(tmp_path, caplog):
    from dataset.demo_hard import write_hard_release
    from dataset.slake import convert, read_release
    raw = write_hard_release(tmp_path / "raw", seed=0, n_train=6, n_val=2, n_test=2)
    (raw / "imgs" / "hard2" / "detection.json").write_text('[{"Cyst": [1, 2]}]')  # malformed
    (raw / "imgs" / "hard3" / "detection.json").unlink()  # missing
    m = convert(read_release(raw), tmp_path / "a")
    boxes = json.loads((tmp_path / "a" / "medical_boxes.json").read_text())
    assert m["images_with_boxes"] == 8 and len(boxes) == 8
    assert "hard2/source.png" not in boxes and "hard3/source.png" not in boxes
    assert any("hard2/source.png" in w for w in m["box_warnings"])
    params = json.loads((raw / "demo_params.json").read_text())["hard1/source.png"]
    b = boxes["hard1/source.png"]
    assert b["size"] == [224, 224]
    organ = "Lung" if params["region"] == "chest" else "Kidney"
    assert f"Left {organ}" in b["boxes"] and f"Right {organ}" in b["boxes"]
    kinds = Counter(k.capitalize() for side in ("left", "right") for k in params["findings"][side])
    assert {k: len(v) for k, v in b["boxes"].items() if "Left" not in k and "Right" not in k} == dict(kinds)
    # the same release as imgs.zip (the hub snapshot's layout)
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for f in ("train.json", "validate.json", "test.json"):
        (zipped / f).write_bytes((raw / f).read_bytes())
    with zipfile.ZipFile(zipped / "imgs.zip", "w") as z:
        for p in sorted((raw / "imgs").rglob("*")):
            if p.is_file():
                z.write(p, f"imgs/{p.relative_to(raw / 'imgs').as_posix()}")
    convert(read_release(zipped), tmp_path / "b")
    assert json.loads((tmp_path / "b" / "medical_boxes.json").read_text()) == boxes


def test_grounded_questions_follow_box_containment():
    from dataset.boxes import grounded_questions
    table = {"a": {"size": [100, 100], "boxes": {"Left Lung": [[0, 0, 50, 100]], "Right Lung": [[50, 0, 50, 100]],
                                                 "Cyst": [[10, 10, 10, 10]], "Nodule": [[60, 60, 8, 8], [5, 80, 8, 8]]}},
             "b": {"size": [100, 100], "boxes": {"Liver": [[0, 0, 100, 100]], "Edema": [[40, 40, 10, 10]]}},
             "c": {"size": [100, 100], "boxes": {}}}
    qs = grounded_questions(table, ["a", "b", "c"])
    assert set(qs) == {"a", "b"}
    assert dict(qs["a"]) == {"Is there a cyst in the left lung?": "Yes", "Is there a cyst in the right lung?": "No",
                             "Is there a nodule in the left lung?": "Yes", "Is there a nodule in the right lung?": "Yes",
                             "Is there an edema in the left lung?": "No", "Is there an edema in the right lung?": "No"}
    assert dict(qs["b"]) == {"Is there a cyst in the liver?": "No", "Is there an edema in the liver?": "Yes",
                             "Is there a nodule in the liver?": "No"}


def test_converter_adds_box_questions_to_stage_one_only(tmp_path):
    import convert_slake_dataset
    from dataset.contract import read_jsonl
    for flag, expect in (([], True), (["--no-box_questions"], False)):
        out = tmp_path / str(expect)
        assert convert_slake_dataset.main(["--demo", "hard", "--out_dir", str(out), "--demo_images", "8", "2", "2",
                                           *flag]) == 0
        pre = read_jsonl(out / "medical_pretrain.jsonl")
        boxed = [r for r in pre if r.get("source") == "boxes"]
        assert bool(boxed) == expect and (len(boxed) == 8 * 6 if expect else True)
        train_images = {r["image"] for r in read_jsonl(out / "medical_vqa_train.jsonl")}
        assert {r["image"] for r in boxed} <= train_images  # never a validation or test image
        m = json.loads((out / "manifest.json").read_text())
        assert m["pretrain_box_questions"] == len(boxed) and m["pretrain_captions"] == 8


# ------------------------------------------------------------------ attention grounding (--look_loss)

def test_look_targets_follow_the_named_boxes(tokenizer, tmp_path):
    from dataset.vqa_dataset import annotate_look
    rows = [("Is there a cyst in the left lung?", "Yes", "CLOSED"), ("Is there a cyst in the right lung?", "No", "CLOSED"),
            ("How many cysts are in the image?", "1", "OPEN"), ("What modality is this?", "CT", "OPEN")]
    data = VQADataset(_write(tmp_path, rows), tmp_path / "img", ChatEncoder(tokenizer, 196), 512)
    classes = ["Cyst", "Left Lung", "Right Lung"]
    targets = torch.zeros(4, 4, 3)  # 4 images x 4 patches x names; every row uses its own image
    for img in range(4):
        targets[img, :2, 1] = 1   # left lung: patches 0, 1
        targets[img, 2:, 2] = 1   # right lung: patches 2, 3
        targets[img, 1, 0] = 1    # a cyst in patch 1 (left)
    known = torch.ones(4, dtype=torch.bool)
    assert annotate_look(data, classes, targets, known) == 3
    looks = [s.look for s in data.samples]
    assert looks[0].tolist() == [0, 1, 0, 0]          # cyst AND left lung: the cyst's patch
    assert looks[1].tolist() == [0, 0, 0.5, 0.5]      # no cyst on the right: search the right lung
    assert looks[2].tolist() == [0, 1, 0, 0]          # plural names match
    assert looks[3] is None
    batch = collate(data.samples, 0, None)
    assert batch["look_target"].shape == (3, 4) and batch["look_image"].tolist() == [0, 1, 2]
    first = [int((batch["labels"][i] != IGNORE_INDEX).nonzero()[0]) - 1 for i in range(3)]
    assert batch["look_pos"].tolist() == [i * batch["input_ids"].shape[1] + p for i, p in enumerate(first)]


def test_look_loss_is_the_attention_cross_entropy():
    from trainer.losses import look_loss
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    slots = torch.tensor([1, 2, 3, 11, 12, 13])  # two images of 3 patches, one per row
    target = torch.tensor([[0, 1.0, 0], [0.5, 0.5, 0]])
    loss = look_loss(q, k, torch.tensor([7, 18]), slots, torch.tensor([0, 1]), target)
    att0 = torch.softmax(k[0, 1:4] @ q[0, 7] / 8 ** 0.5, 0)
    att1 = torch.softmax(k[1, 1:4] @ q[1, 8] / 8 ** 0.5, 0)
    want = -(torch.log(att0[1]) + 0.5 * torch.log(att1[0]) + 0.5 * torch.log(att1[1])) / 2
    assert torch.allclose(loss, want, atol=1e-6)
    # the loss is lowest when the head attends where the target is
    sharp = torch.zeros(2, 10, 8)
    sharp_k = torch.zeros(2, 10, 8)
    sharp[0, 7, 0] = 50.0
    sharp_k[0, 2, 0] = 1.0
    assert float(look_loss(sharp, sharp_k, torch.tensor([7]), slots[:3], torch.tensor([0]), target[:1])) < 1e-3


def test_look_loss_trains_end_to_end_and_changes_nothing_at_inference(tmp_path):
    import convert_slake_dataset
    from trainer.cli import main as train_main
    d = tmp_path / "d"
    assert convert_slake_dataset.main(["--demo", "hard", "--out_dir", str(d), "--demo_images", "16", "4", "4"]) == 0
    args = ["--vision_model", "random-tiny", "--hidden_size", "48", "--num_hidden_layers", "2",
            "--num_attention_heads", "4", "--num_key_value_heads", "2", "--device", "cpu", "--num_workers", "0",
            "--images_path", str(d / "medical_images"), "--cache_dir", "", "--epochs", "1", "--batch_size", "8",
            "--data_path", str(d / "medical_vqa_train.jsonl"), "--val_path", "", "--seed", "3"]
    assert train_main("sft", args + ["--out_dir", str(tmp_path / "a"), "--look_loss", "1"]) == 0
    assert train_main("sft", args + ["--out_dir", str(tmp_path / "b"), "--look_loss", "0"]) == 0
    a = torch.load(tmp_path / "a" / "medical_vlm_48.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "medical_vlm_48.pth", weights_only=True)
    assert a["model"].keys() == b["model"].keys()  # no new weights: the same model, trained differently
    assert not torch.equal(a["model"]["llm.layers.1.self_attn.q_proj.weight"],
                           b["model"]["llm.layers.1.self_attn.q_proj.weight"])


def test_look_targets_survive_shared_prefix_packing(tokenizer, tmp_path):
    from dataset.vqa_dataset import PackedQuestions, annotate_look
    rows = [("Is there a cyst in the left lung?", "Yes", "CLOSED"), ("How many cysts are in the image?", "1", "OPEN"),
            ("What modality is this?", "CT", "OPEN")]
    path = tmp_path / "d.jsonl"
    (tmp_path / "img").mkdir()
    random_image(0).save(tmp_path / "img" / "0.png")
    path.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"<image>\n{q}"},
                                                          {"role": "assistant", "content": a}],
                                        "image": "0.png", "answer_type": t}) + "\n" for q, a, t in rows))
    enc = ChatEncoder(tokenizer, 196)
    data = VQADataset(path, tmp_path / "img", enc, 512)
    targets = torch.zeros(1, 196, 2)
    targets[0, :98, 1] = 1
    targets[0, 5, 0] = 1
    assert annotate_look(data, ["Cyst", "Left Lung"], targets, torch.ones(1, dtype=torch.bool)) == 2
    packed = PackedQuestions(data, enc.image_id, 3, seed=0).epoch_samples(0)
    assert len(packed) == 1 and len(packed[0].looks) == 2
    batch = collate(packed, 0, enc.image_id)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    for pos in batch["look_pos"].tolist():  # each points at the token just before an answer begins
        assert labels[pos] == IGNORE_INDEX and labels[pos + 1] != IGNORE_INDEX
    firsts = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    assert len(firsts) == 3 and {p + 1 for p in batch["look_pos"].tolist()} < set(firsts)
    assert batch["look_image"].tolist() == [0, 0]


def test_look_maps_are_head_zero_attention_and_ignore_padding(tokenizer, tiny_tower):
    from evaluation.relevance import relevance_maps
    model = make_tiny_model(tokenizer, tiny_tower, spread=0.2)
    enc = ChatEncoder(tokenizer, model.config.image_tokens)
    prompts = [enc.encode([{"role": "user", "content": f"<image>\n{q}"}], add_generation_prompt=True).input_ids
               for q in ("Is there a cyst in the left lung?", "Where?")]
    feats = torch.randn(2, model.config.image_tokens, model.config.vision_hidden_size,
                        generator=torch.Generator().manual_seed(1))
    both = relevance_maps(model, prompts, feats, "look")
    assert both.shape == (2, model.config.image_tokens) and torch.allclose(both.sum(-1), torch.ones(2), atol=1e-5)
    for i in range(2):  # alone (no padding) = in the padded batch
        alone = relevance_maps(model, [prompts[i]], feats[i:i + 1], "look")
        assert torch.allclose(alone[0], both[i], atol=1e-5)
    # and it is what head 0 computes: softmax(q_last . k_image / sqrt(d))
    ids = torch.tensor([prompts[0]])
    look = model.llm.layers[-1].self_attn
    look.keep_qk = True
    with torch.no_grad():
        model.llm(model.embed(ids, feats[:1]))
    q, k = look.kept_qk
    look.keep_qk = False
    slots = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    want = torch.softmax(k[0, slots] @ q[0, -1] / q.shape[-1] ** 0.5, 0)
    assert torch.allclose(both[0], want, atol=1e-5)


def test_evaluation_reports_where_the_model_looked(tmp_path, tokenizer, tiny_tower):
    d, m = evaluated_hard_set(tmp_path, tokenizer, tiny_tower)
    p = m["pointing"]
    n_naming = sum(1 for line in (d / "medical_vqa_test.jsonl").read_text().splitlines()
                   if any(w in line.lower() for w in ("lung", "kidney", "nodule", "cyst", "calcification")))
    assert 0 < p["count"] <= n_naming and all(0 <= p[k] <= 1 for k in ("hit_rate", "uniform", "centre"))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["pointing"] == p


def evaluated_hard_set(tmp_path, tokenizer, tiny_tower):
    """A small hard demo set (with boxes) and a tiny random model's evaluation of it: (data folder, metrics)."""
    import convert_slake_dataset
    from evaluation.runner import evaluate_split
    from model.checkpoint import load_model
    d = tmp_path / "d"
    assert convert_slake_dataset.main(["--demo", "hard", "--out_dir", str(d), "--demo_images", "8", "2", "6"]) == 0
    path = save_checkpoint_tiny(tmp_path, tokenizer, tiny_tower)
    return d, evaluate_split(load_model(path), d / "medical_vqa_test.jsonl", d / "medical_images",
                             d / "medical_vqa_train.jsonl", tmp_path / "eval", torch.device("cpu"), cache_dir=None)


def save_checkpoint_tiny(tmp_path, tokenizer, tiny_tower):
    from model.checkpoint import save_checkpoint
    return save_checkpoint(tmp_path / "m.pth", make_tiny_model(tokenizer, tiny_tower, spread=0.1), tokenizer, "sft", 1)


# ------------------------------------------------------------------ confidence and calibration (#21)

def test_candidate_scores_are_teacher_forced_log_likelihoods(tokenizer, tiny_tower):
    from evaluation.scoring import candidate_log_likelihoods
    model = make_tiny_model(tokenizer, tiny_tower, spread=0.2)
    enc = ChatEncoder(tokenizer, model.config.image_tokens)
    prompts = [enc.encode([{"role": "user", "content": f"<image>\n{q}"}], add_generation_prompt=True).input_ids
               for q in ("Is there a cyst?", "Is this a CT image of the chest?")]
    end = model.config.eos_token_id
    cands = [tokenizer("Yes", add_special_tokens=False)["input_ids"] + [end],
             tokenizer("No", add_special_tokens=False)["input_ids"] + [end],
             tokenizer("Left Lung", add_special_tokens=False)["input_ids"] + [end]]
    feats = torch.randn(2, model.config.image_tokens, model.config.vision_hidden_size,
                        generator=torch.Generator().manual_seed(2))
    ll = candidate_log_likelihoods(model, prompts, feats, cands)
    assert ll.shape == (2, 3) and bool((ll < 0).all())
    for i in range(2):
        for j, c in enumerate(cands):  # the same number from the full logits of one unpadded sequence
            ids = torch.tensor([prompts[i] + c])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids, feats[i:i + 1]).float(), -1)[0]
            want = sum(float(logp[len(prompts[i]) - 1 + t, tok]) for t, tok in enumerate(c))
            assert abs(float(ll[i, j]) - want) < 1e-4
    probs = torch.softmax(ll, -1)
    assert torch.allclose(probs.sum(-1), torch.ones(2))


@pytest.mark.parametrize("probs, correct, ece, brier, top_half", [
    ([0.9, 0.9, 0.9, 0.9], [True, True, True, False], 0.15, (3 * 0.01 + 0.81) / 4, 1.0),
    ([1.0, 0.5], [True, False], 0.25, 0.125, 1.0),
    ([0.6, 0.7, 0.95, 0.99], [False, True, True, True], (0.6 + 0.3 + 0.05 + 0.01) / 4, None, 1.0),
])
def test_calibration_numbers(probs, correct, ece, brier, top_half):
    from evaluation.scoring import calibration
    c = calibration(probs, correct)
    assert c["ece"] == pytest.approx(ece) and c["accuracy"] == pytest.approx(sum(correct) / len(correct))
    if brier is not None:
        assert c["brier"] == pytest.approx(brier)
    assert c["accuracy_at_coverage"]["50%"] == pytest.approx(top_half)
    assert sum(r["count"] for r in c["reliability"]) == len(probs)


def test_evaluation_reports_confidence_and_writes_the_reliability_diagram(tmp_path, tokenizer, tiny_tower):
    d, m = evaluated_hard_set(tmp_path, tokenizer, tiny_tower)
    c = m["calibration"]
    n_closed = m["count"]["closed"]
    assert c["count"] == n_closed and sorted(c["candidates"]) == ["No", "Yes"] and 0 <= c["ece"] <= 1
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    scored = [p for p in preds if "answer_probs" in p]
    assert len(scored) == n_closed and all(p["answer_type"] == "CLOSED" for p in scored)
    assert all(abs(sum(p["answer_probs"].values()) - 1) < 1e-4 for p in scored)
    png = (tmp_path / "eval" / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_checkpoint_with_a_patch_head_still_loads(ckpt_for_compat):
    """A model trained with the removed --patch_loss carries a training-only head: it loads (the
    answers never used the head) and answers exactly as before."""
    from model.checkpoint import load_model
    path, tmp_path = ckpt_for_compat
    plain = load_model(path, vision_model="random-tiny")
    obj = torch.load(path, weights_only=False)
    obj["config"]["patch_labels"] = ["Liver", "Cyst"]
    obj["model"]["patch_head.weight"] = torch.zeros(2, obj["config"]["hidden_size"])
    obj["model"]["patch_head.bias"] = torch.zeros(2)
    torch.save(obj, tmp_path / "old.pth")
    old = load_model(tmp_path / "old.pth", vision_model="random-tiny")
    a, b = plain.model.state_dict(), old.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def ckpt_for_compat(tmp_path, tokenizer, tiny_tower):
    return save_checkpoint_tiny(tmp_path, tokenizer, tiny_tower), tmp_path


@pytest.mark.parametrize("field, value, message", [("projector", "film", "film"),
                                                   ("vision_tuned_layers", 1, "--train_vision")])
def test_models_of_removed_levers_are_refused_by_name(field, value, message, ckpt_for_compat):
    from model.checkpoint import CheckpointError, load_model
    path, tmp_path = ckpt_for_compat
    obj = torch.load(path, weights_only=False)
    obj["config"][field] = value
    torch.save(obj, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(tmp_path / "old.pth", vision_model="random-tiny")
    assert "commit" in str(err.value)


def test_removed_vision_config_at_its_default_still_loads(ckpt_for_compat):
    """Checkpoints written before --train_vision was removed carry its fields at 0 / {}: they load."""
    from model.checkpoint import load_model
    path, tmp_path = ckpt_for_compat
    obj = torch.load(path, weights_only=False)
    obj["config"].update(vision_tuned_layers=0, vision_layer_config={}, patch_labels=[])
    torch.save(obj, tmp_path / "old.pth")
    assert load_model(tmp_path / "old.pth", vision_model="random-tiny").model.config.projector == "mlp"


def test_look_loss_sum_is_the_mean_times_the_questions():
    """The training step sums the look loss and divides by the global count of look questions
    (so two processes or two micro-batches give the mean of one big batch); padding slots count 0."""
    from trainer.losses import look_loss
    torch.manual_seed(0)
    q, k = torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    slots = torch.cat([torch.arange(0, 4), torch.arange(20, 24)])
    target = torch.softmax(torch.randn(3, 4), -1)
    pos, img, weight = torch.tensor([7, 18, 30]), torch.tensor([0, 1, 1]), torch.tensor([1.0, 1.0, 0.0])
    mean = look_loss(q, k, pos, slots, img, target, weight)
    total = look_loss(q, k, pos, slots, img, target, weight, reduction="sum")
    assert float(total) == pytest.approx(2 * float(mean)) and float(mean) > 0
    first = look_loss(q, k, pos[:1], slots, img[:1], target[:1], reduction="sum")
    second = look_loss(q, k, pos[1:2], slots, img[1:2], target[1:2], reduction="sum")
    assert float(first + second) == pytest.approx(float(total))


def test_contrast_look_targets_point_at_what_tells_the_answers_apart(tokenizer, tmp_path):
    """--look_contrast: a closed text answered both ways looks where its image differs from the
    images answered otherwise (for a Yes: the cyst); texts answered one way and questions with a
    box target are left alone."""
    from dataset.vqa_dataset import annotate_contrast_look
    rows = [("Is there a cyst?", "Yes", "CLOSED"), ("Is there a cyst?", "No", "CLOSED"),
            ("Is there a cyst?", "Yes", "CLOSED"), ("Is there a cyst?", "No", "CLOSED"),
            ("Is this a CT?", "Yes", "CLOSED"), ("How many cysts?", "1", "OPEN"),
            ("Is there a cyst?", "Yes", "CLOSED"), ("Is there a cyst?", "no", "CLOSED")]  # images 0-3, 0-3
    data = VQADataset(_write(tmp_path, rows), tmp_path / "img", ChatEncoder(tokenizer, 196), 512)
    feats = torch.randn(4, 16, 6, generator=torch.Generator().manual_seed(0)) * 0.01
    feats[[0, 2], 5] += 3.0  # images 0 and 2 (the Yes rows) have something at patches 5 and 6
    feats[[0, 2], 6] += 2.0
    boxed = torch.zeros(16)
    boxed[1] = 1.0
    data.samples[6].look = boxed  # a box target wins over the contrast
    calls = []

    def rows_of(index):
        calls.append(index.tolist())
        return feats[index]

    assert annotate_contrast_look(data, rows_of, side=4, share=8) == 5  # 16 patches -> the top 2
    for i in (0, 1, 2, 3, 7):  # Yes and No rows of the cyst text (row 7's "no" is the same answer as "No")
        look = data.samples[i].look
        assert look.shape == (16,) and torch.isclose(look.sum(), torch.tensor(1.0))
        # the Yes images: their cyst; the No images: where the Yes images have theirs
        assert look.nonzero().flatten().tolist() == [5, 6], i
    assert [data.samples[i].look for i in (4, 5)] == [None, None]
    assert torch.equal(data.samples[6].look, boxed)
    # texts with one answer cost no feature reads; batches of the image table rows only
    assert all(set(c) <= {0, 1, 2, 3} for c in calls) and calls


def test_contrast_looks_ignore_anatomy_that_moves(tokenizer, tmp_path):
    """--look_contrast twoway compares each place with the other answers' images near the same
    place (one patch each way on an 8 x 8 grid): an organ every image has, one patch off in each
    (real scans are not aligned), is no difference; the cyst that only the Yes images have is,
    wherever it sits, and a No image looks at a place where a Yes image has its cyst. The mean
    comparison (removed) pointed at the moved organ instead."""
    from dataset.vqa_dataset import PatchBank, _patch_bank, annotate_contrast_look
    rows = [("Is there a cyst?", "Yes", "CLOSED"), ("Is there a cyst?", "No", "CLOSED")] * 2
    path = _write(tmp_path, rows)
    gen = torch.Generator().manual_seed(0)
    organ, cyst = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    organ, cyst = 4 * organ / organ.norm(), 3 * cyst / cyst.norm()
    feats = torch.randn(4, 64, 6, generator=gen) * 0.01
    for image, place in enumerate((27, 28, 35, 36)):  # rows 3-4, columns 3-4
        feats[image, place] += organ
    feats[0, 9] += cyst   # the Yes images' cysts, at different places
    feats[2, 54] += cyst
    data = VQADataset(path, tmp_path / "img", ChatEncoder(tokenizer, 64), 512)
    assert annotate_contrast_look(data, lambda index: feats[index], side=8, share=64) == 4
    looks = [s.look.nonzero().flatten().tolist() for s in data.samples]
    assert looks[0] == [9] and looks[2] == [54]  # the cyst, wherever it is, not the organ
    assert looks[1][0] in (9, 54) and looks[3][0] in (9, 54)  # where a Yes image has its cyst
    # (the removed mean comparison picked the organ here: at patches 28 and 36 the No images have it, image 0 not)
    assert int(((feats[0] - feats[[1, 3]].mean(0)).norm(dim=-1)).argmax()) in (27, 28, 36)
    # the bank: a fixed sample, the same count from every image, bounded
    bank = _patch_bank(lambda index: feats[index], [0, 1, 2, 3], size=8)
    again = _patch_bank(lambda index: feats[index], [0, 1, 2, 3], size=8)
    assert bank.feats.shape == (8, 6) and torch.equal(bank.feats, again.feats) and torch.equal(bank.places, again.places)
    found = [int(((feats.reshape(-1, 6) - b).norm(dim=1)).argmin()) for b in bank.feats]
    assert sorted(f // 64 for f in found) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [f % 64 for f in found] == bank.places.tolist()  # each patch's place in its image
    assert _patch_bank(lambda index: feats[index], [1, 3]).feats.shape == (128, 6)  # fewer than the bound: all


def test_two_way_contrast_looks_at_the_same_place_both_ways(tokenizer, tmp_path):
    """--look_contrast twoway on an 8 x 8 grid (reach 1 patch): a lesion-free image ("No") looks
    where the Yes images have their lesion; "Is the lesion on the left?" looks at the left
    lesion and at the right, where the other answer's images have theirs (the nearest
    comparison, anywhere, finds nothing there: a lesion is like a lesion); the distance equals
    brute force, and an empty window counts as the image's most novel."""
    from dataset.vqa_dataset import PatchBank, _far_from_bank, _two_way_sq_distance, annotate_contrast_look
    rows = [("Is there a lesion?", "Yes", "CLOSED"), ("Is there a lesion?", "No", "CLOSED")] * 3
    rows += [("Is the lesion on the left?", "Yes", "CLOSED"), ("Is the lesion on the left?", "No", "CLOSED")] * 3
    path = _write(tmp_path, rows)  # then one image per question
    for i in range(4, 12):
        random_image(i).save(tmp_path / "img" / f"{i}.png")
    path.write_text("".join(json.dumps({**json.loads(line), "image": f"{i}.png"}) + "\n"
                            for i, line in enumerate(path.read_text().splitlines())))
    gen = torch.Generator().manual_seed(0)
    lesion = torch.randn(6, generator=gen)
    lesion = 3 * lesion / lesion.norm()
    feats = torch.randn(12, 64, 6, generator=gen) * 0.01
    left, right = 3 * 8 + 1, 3 * 8 + 6   # row 3, columns 1 and 6
    for image in (0, 2, 4):
        feats[image, left] += lesion      # lesion present (Yes); images 1, 3, 5 have none
    for image in (6, 8, 10):
        feats[image, left] += lesion      # on the left (Yes)
    for image in (7, 9, 11):
        feats[image, right] += lesion     # on the right (No)
    data = VQADataset(path, tmp_path / "img", ChatEncoder(tokenizer, 64), 512)
    assert annotate_contrast_look(data, lambda index: feats[index], side=8, share=32) == 12
    looks = [set(s.look.nonzero().flatten().tolist()) for s in data.samples]
    assert all(left in looks[i] for i in range(6))  # its own lesion; lesion-free: where the others have theirs
    assert all(looks[i] == {left, right} for i in range(6, 12))  # both places the answer is decided at
    # brute force: near the same place, both ways
    x = torch.randn(2, 16, 5, generator=gen)
    bank = PatchBank(torch.randn(30, 5, generator=gen), torch.randint(0, 16, (30,), generator=gen))
    d = ((x[:, :, None] - bank.feats) ** 2).sum(-1)   # [2, 16, 30]
    ys, xs = torch.arange(16) // 4, torch.arange(16) % 4
    near = ((ys[:, None] - ys[bank.places][None]).abs() <= 1) & ((xs[:, None] - xs[bank.places][None]).abs() <= 1)
    d = d.masked_fill(~near, float("inf"))
    here = d.amin(2)
    here = torch.where(here.isinf(), here.masked_fill(here.isinf(), 0).amax(1, keepdim=True), here)
    there = d.amin(1)
    missing = torch.stack([torch.stack([there[i, bank.places == p].mean() if (bank.places == p).any()
                                        else torch.tensor(0.0) for p in range(16)]) for i in range(2)])
    far = _far_from_bank(bank, side=4, radius=1)
    assert torch.allclose(_two_way_sq_distance(x, bank, far), here + missing, atol=1e-4)



@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_contrast_look_is_on_by_default_in_both_stages(stage):
    assert parse_train_args(stage, []).look_contrast == "twoway"
    assert parse_train_args(stage, ["--look_contrast", "none"]).look_contrast == "none"


@pytest.mark.parametrize("argv, want", [([], 4), (["--look_contrast", "none"], 0),
                                        (["--look_loss", "0"], 0)])
def test_training_attaches_contrast_looks_unless_told_not_to(argv, want, tokenizer, tmp_path, caplog):
    """The trainer's wiring: without boxes, the closed texts answered both ways get their targets
    from the frozen features by default; none with --look_contrast none or --look_loss 0."""
    from types import SimpleNamespace
    from trainer.trainer import look_targets
    rows = [("Is there a cyst?", "Yes", "CLOSED"), ("Is there a cyst?", "No", "CLOSED")] * 2 + \
           [("How many cysts?", "1", "OPEN")]
    path = _write(tmp_path, rows)
    data = VQADataset(path, tmp_path / "img", ChatEncoder(tokenizer, 16), 512)
    cfg = parse_train_args("sft", ["--data_path", str(path)] + argv)
    feats = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1))
    model = SimpleNamespace(config=SimpleNamespace(image_tokens=16))
    with caplog.at_level("INFO"):
        look_targets(cfg, model, data, SimpleNamespace(get=lambda index: feats[index]))
    looks = [s.look for s in data.samples]
    assert sum(t is not None for t in looks) == want
    assert all(t is None or int((t > 0).sum()) == 2 for t in looks)  # 16 patches: the top eighth
    assert ("not told where to look" in caplog.text) == (want == 0 and "--look_loss" not in argv)


def test_contrast_look_gives_open_questions_targets_too(tokenizer, tmp_path):
    """--look_contrast: an open text answered more than one way ("How many cysts?" 2 / 0) looks
    where its image differs from the images answered otherwise, like the closed ones; an open text
    answered one way and a caption (no answer_type: not a question) get none."""
    from dataset.vqa_dataset import annotate_contrast_look
    rows = [("How many cysts?", "2", "OPEN"), ("How many cysts?", "0", "OPEN"),
            ("How many cysts?", "2", "OPEN"), ("How many cysts?", "0", "OPEN"),
            ("What modality?", "CT", "OPEN"), ("What modality?", "CT", "OPEN")]
    path = _write(tmp_path, rows)
    caption = {"conversations": [{"role": "user", "content": "<image>\nDescribe the image."},
                                 {"role": "assistant", "content": "Two cysts."}], "image": "0.png"}
    other = dict(caption, image="1.png", conversations=[caption["conversations"][0],
                                                         {"role": "assistant", "content": "No cyst."}])
    path.write_text(path.read_text() + json.dumps(caption) + "\n" + json.dumps(other) + "\n")
    feats = torch.randn(4, 16, 6, generator=torch.Generator().manual_seed(0)) * 0.01
    feats[[0, 2], 5] += 3.0  # the "2" images have their cysts at patches 5 and 6
    feats[[0, 2], 6] += 2.0
    data = VQADataset(path, tmp_path / "img", ChatEncoder(tokenizer, 16), 512)
    assert annotate_contrast_look(data, lambda index: feats[index], side=4, share=8) == 4
    for i in range(4):  # two patches each: the "2" images' cysts, and where the "0" images lack them
        assert data.samples[i].look.nonzero().flatten().tolist() == [5, 6], i
    assert [data.samples[i].look for i in range(4, 8)] == [None] * 4
