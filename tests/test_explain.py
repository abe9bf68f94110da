"""Show why (issue #21): relevance maps by four methods, the pointing game per method and per
question group, overlays, explanations with probabilities and alternatives in the API and the
web demo, and abstaining below a probability."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.language_model import AttentionProbe
import torch.nn.functional as F
from PIL import Image

import eval_vlm
from dataset.boxes import pointing_group
from evaluation.explain import NOT_SURE, answer_sets, explain
from evaluation.relevance import DEFAULT_RELEVANCE, METHODS, model_view, overlay, relevance_maps
from evaluation.scoring import abstention, calibration, candidate_log_likelihoods
from model.tokenization import ChatEncoder
from tests.helpers import make_tiny_model, random_image
from tests.test_grounding import save_checkpoint_tiny

QUESTIONS = ("Is there a cyst in the left lung?", "How many findings are in the right kidney?", "Where?")


def _setup(tokenizer, tiny_tower, seed=1):
    model = make_tiny_model(tokenizer, tiny_tower, spread=0.2).eval()
    enc = ChatEncoder(tokenizer, model.config.image_tokens)
    prompts = [enc.encode([{"role": "user", "content": f"<image>\n{q}"}], add_generation_prompt=True).input_ids
               for q in QUESTIONS]
    feats = torch.randn(len(prompts), model.config.image_tokens, model.config.vision_hidden_size,
                        generator=torch.Generator().manual_seed(seed))
    end = model.config.eos_token_id
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [end] for a in ("Yes", "2", "Left Lung")]
    return model, prompts, feats, answers


def test_explicit_attention_equals_the_fast_path(tokenizer, tiny_tower):
    """The explain path computes attention by hand (to keep its weights); its hidden states are
    SDPA's, so a relevance map explains the model that answered."""
    model, prompts, feats, _ = _setup(tokenizer, tiny_tower)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        fast = model.llm(model.embed(ids, feats[:1]))
        probe = AttentionProbe(frozenset(range(len(model.llm.layers))))
        slow = model.llm(model.embed(ids, feats[:1]), probe=probe)
        weights = [probe.weights[i] for i in range(len(model.llm.layers))]
    assert torch.allclose(fast, slow, atol=1e-5)
    t = ids.shape[1]
    for w in weights:  # causal rows summing to 1
        assert w.shape == (1, model.config.num_attention_heads, t, t)
        assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5)
        assert float(w.triu(1).abs().max()) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_distribution_over_the_patches_and_leaves_no_gradients(method, tokenizer, tiny_tower):
    model, prompts, feats, answers = _setup(tokenizer, tiny_tower)
    maps = relevance_maps(model, prompts, feats, method, answers)
    assert maps.shape == (3, model.config.image_tokens)
    assert torch.allclose(maps.sum(-1), torch.ones(3), atol=1e-5) and bool((maps >= 0).all())
    assert all(p.grad is None for p in model.parameters())  # explanations never touch training gradients
    assert not any(hasattr(layer.self_attn, "weights") for layer in model.llm.layers)  # no state on the modules
    for i in range(3):  # alone = in the padded batch
        alone = relevance_maps(model, [prompts[i]], feats[i:i + 1], method, [answers[i]])
        assert torch.allclose(alone[0], maps[i], atol=1e-4)
    other = relevance_maps(model, prompts, feats.flip(0), method, answers)
    assert not torch.allclose(other, maps)  # it depends on the image


def test_gradient_x_input_is_the_gradient_of_the_answer(tokenizer, tiny_tower):
    """grad_x_input by hand: d log p(answer) / d(image-token embedding) . embedding, per patch."""
    model, prompts, feats, answers = _setup(tokenizer, tiny_tower)
    ids = torch.tensor([prompts[0] + answers[0]])
    embeds = model.embed(ids, feats[:1]).detach().requires_grad_(True)
    h = model.llm(embeds)
    logits = model.llm.lm_head(h)[0, len(prompts[0]) - 1:-1]
    F.log_softmax(logits, -1).gather(1, torch.tensor(answers[0])[:, None]).sum().backward()
    slots = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    want = (embeds.grad[0, slots] * embeds[0, slots]).sum(-1).abs().detach()
    got = relevance_maps(model, prompts[:1], feats[:1], "grad_x_input", answers[:1])[0]
    assert torch.allclose(got, want / want.sum(), atol=1e-5)


def test_bad_relevance_requests_are_named(tokenizer, tiny_tower):
    model, prompts, feats, _ = _setup(tokenizer, tiny_tower)
    with pytest.raises(ValueError, match="relevance method must be one of look, rollout"):
        relevance_maps(model, prompts, feats, "saliency")
    with pytest.raises(ValueError, match="needs the answers"):
        relevance_maps(model, prompts, feats, "grad_x_input")


def test_eval_flags_list_the_relevance_methods():
    assert eval_vlm.RELEVANCE_METHODS == METHODS and METHODS[0] == DEFAULT_RELEVANCE


@pytest.mark.parametrize("question,group", [
    ("Is there a cyst in the left lung?", "kind x side"), ("Is there a nodule in the right kidney?", "kind x side"),
    ("How many findings are in the left lung?", "side"), ("Which lung has more findings, the left lung or the "
                                                          "right lung?", "side"),
    ("How many cysts are in the image?", "kind"), ("Is the liver healthy?", "kind"),
    ("What modality is used?", None)])
def test_pointing_groups(question, group):
    names = ["Calcification", "Cyst", "Left Kidney", "Left Lung", "Liver", "Nodule", "Right Kidney", "Right Lung"]
    assert pointing_group(question, names) == group


def test_overlay_marks_the_relevant_patch(tiny_tower):
    view = model_view(tiny_tower, random_image(3, size=(300, 260)))
    assert view.size == (224, 224) and view.mode == "RGB"
    rel = torch.zeros(196)
    rel[2 * 14 + 11] = 1.0  # row 2, column 11
    out = np.asarray(overlay(view, rel), dtype=np.int16)
    base = np.asarray(view, dtype=np.int16)
    cell = 224 // 14
    hot = out[2 * cell + cell // 2, 11 * cell + cell // 2] - base[2 * cell + cell // 2, 11 * cell + cell // 2]
    cold = np.abs(out[12 * cell:, :3 * cell] - base[12 * cell:, :3 * cell]).max()
    assert hot[0] > 20 and hot[1] < 0 and cold == 0  # redder where it looked, untouched elsewhere
    with pytest.raises(ValueError, match="square patch grid"):
        overlay(view, torch.ones(10))


@pytest.mark.parametrize("kind", ["CLOSED", "OPEN"])
def test_explanation_probabilities_and_alternatives(kind, tokenizer, tiny_tower):
    model, prompts, feats, _ = _setup(tokenizer, tiny_tower)
    sets = {"CLOSED": ["Yes", "No"], "OPEN": ["Liver", "Left Lung", "CT", "2"]}
    image = random_image(4)
    answer = "No" if kind == "CLOSED" else "Liver"
    e = explain(model, tokenizer, tiny_tower, image, prompts[0], feats[:1], answer, kind, sets)
    end = model.config.eos_token_id
    cands = [answer] + [a for a in sets[kind] if a != answer]
    ll = candidate_log_likelihoods(model, [prompts[0]], feats[:1],
                                   [tokenizer(a, add_special_tokens=False)["input_ids"] + [end] for a in cands])[0]
    if kind == "CLOSED":  # a distribution over the answer set
        assert e.scored_over == "candidates"
        assert e.probability + sum(p for _, p in e.alternatives) == pytest.approx(1.0, abs=1e-5)
        assert e.probability == pytest.approx(float(torch.softmax(ll, -1)[0]), abs=1e-5)
    else:  # the product of the answer's token probabilities
        assert e.scored_over == "tokens" and e.probability == pytest.approx(float(ll[0].exp()), rel=1e-4)
        assert {a for a, _ in e.alternatives} == set(cands[1:])
    assert [p for _, p in e.alternatives] == sorted((p for _, p in e.alternatives), reverse=True)
    assert e.relevance.shape == (14, 14) and e.relevance.sum() == pytest.approx(1.0, abs=1e-5)
    assert e.overlay.size == (224, 224) and not e.abstained and e.answer == answer
    sure = explain(model, tokenizer, tiny_tower, image, prompts[0], feats[:1], answer, kind, sets,
                   abstain_below=e.probability + 1e-6)
    assert sure.abstained and sure.answer == NOT_SURE and sure.model_answer == answer
    assert "not sure (the model's answer" in sure.summary()


def test_answer_sets_keep_the_commonest_spelling():
    rows = [{"answer": a, "answer_type": t} for a, t in
            [("Yes", "CLOSED"), ("yes", "CLOSED"), ("Yes", "CLOSED"), ("No", "CLOSED"), ("Liver", "OPEN"),
             ("liver", "OPEN"), ("Liver", "OPEN"), ("CT", "OPEN")]]
    assert answer_sets(rows) == {"CLOSED": ["Yes", "No"], "OPEN": ["Liver", "CT"]}


def test_api_explain_and_abstain(tokenizer, tiny_tower, tmp_path):
    import convert_slake_dataset
    from evaluation.api import MedicalVQA
    from evaluation.explain import Explanation
    d = tmp_path / "d"
    assert convert_slake_dataset.main(["--demo", "hard", "--out_dir", str(d), "--demo_images", "8", "2", "2"]) == 0
    vqa = MedicalVQA.load(save_checkpoint_tiny(tmp_path, tokenizer, tiny_tower), device="cpu")
    image = random_image(5)
    plain = vqa.answer(image, "Is there a cyst in the left lung?")
    e = vqa.answer(image, "Is there a cyst in the left lung?", explain=True)
    assert isinstance(e, Explanation) and e.model_answer == plain and e.question_type == "CLOSED"
    assert {a for a, _ in e.alternatives} | {e.model_answer} >= {"Yes", "No"}  # SLAKE's set without a split
    vqa.candidates(d / "medical_vqa_train.jsonl")
    open_e = vqa.answer(image, "Which organ is abnormal?", explain=True, relevance="rollout")
    assert open_e.method == "rollout" and open_e.scored_over == "tokens" and open_e.alternatives
    assert vqa.answer(image, "Is there a cyst in the left lung?", abstain_below=1.0) == NOT_SURE
    assert vqa.answer(image, "Is there a cyst in the left lung?", abstain_below=0.0) == plain
    with pytest.raises(ValueError, match="abstain_below must be a probability"):
        vqa.answer(image, "Is it normal?", abstain_below=1.5)


@pytest.mark.parametrize("threshold,coverage,accuracy", [(0.5, 1.0, 0.6), (0.75, 0.6, 2 / 3), (0.95, 0.2, 1.0),
                                                         (0.99, 0.0, None)])
def test_abstention_coverage_and_accuracy(threshold, coverage, accuracy):
    probs = [0.55, 0.6, 0.8, 0.9, 0.97]
    correct = [False, True, False, True, True]
    a = abstention(probs, correct, threshold)
    assert a["coverage"] == pytest.approx(coverage) and a["accuracy"] == pytest.approx(accuracy)
    assert calibration(probs, correct, thresholds=(threshold,))["abstain"] == [a]


def test_evaluation_compares_methods_and_writes_overlays(tmp_path, tokenizer, tiny_tower):
    import convert_slake_dataset
    from evaluation.runner import evaluate_split, format_table
    from model.checkpoint import load_model
    d = tmp_path / "d"
    assert convert_slake_dataset.main(["--demo", "hard", "--out_dir", str(d), "--demo_images", "8", "2", "6"]) == 0
    path = save_checkpoint_tiny(tmp_path, tokenizer, tiny_tower)
    m = evaluate_split(load_model(path), d / "medical_vqa_test.jsonl", d / "medical_images",
                       d / "medical_vqa_train.jsonl", tmp_path / "eval", torch.device("cpu"), cache_dir=None,
                       relevance="all", overlays=3, abstain_below=0.7, explain_answers=True)
    p = m["pointing"]
    assert p["method"] == DEFAULT_RELEVANCE and set(p["methods"]) == set(METHODS)
    assert p["methods"][DEFAULT_RELEVANCE]["hit_rate"] == p["hit_rate"]
    assert set(p["by_group"]) <= {"kind", "side", "kind x side"} and sum(g["count"] for g in p["by_group"].values()) \
        == p["count"]
    for g in p["by_group"].values():
        assert 0 <= g["hit_rate"] <= 1 and 0 < g["uniform"] < 1
    pngs = sorted((tmp_path / "eval" / "overlays").glob("*.png"))
    assert m["overlays"] == len(pngs) == 3
    assert all(Image.open(f).size[0] == 448 for f in pngs)
    c = m["calibration"]
    assert c["abstain_below"]["threshold"] == 0.7 and 0.7 in [a["threshold"] for a in c["abstain"]]
    table = format_table(m)
    assert "where it looked (look)" in table and "kind x side" in table and "answering 'not sure' below 0.7" in table
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["pointing"]["methods"].keys() == set(METHODS)
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all("probability" in r and 0 <= r["probability"] <= 1 for r in preds)
    for r in preds:
        if r["answer_type"] == "CLOSED":  # a distribution over the closed set (and the answer, when outside it)
            assert r["scored_over"] == "candidates"
            assert r["probability"] + sum(p for _, p in r["alternatives"]) == pytest.approx(1.0, abs=1e-4)
            if r["prediction"] in r["answer_probs"]:
                assert r["probability"] == pytest.approx(r["answer_probs"][r["prediction"]], abs=1e-4)
        else:
            assert r["scored_over"] == "tokens" and len(r["alternatives"]) == 3
            assert all(p <= 1 for _, p in r["alternatives"])


def test_web_demo_answer_comes_with_confidence_and_overlay(tokenizer, tiny_tower, tmp_path):
    from model.checkpoint import save_checkpoint
    from webdemo.app import EXAMPLES_DIR, Session, confidence_html
    path = save_checkpoint(tmp_path / "medical_vlm_64.pth", make_tiny_model(tokenizer, tiny_tower, spread=0.1),
                           tokenizer, "sft", 0)
    s = Session([path], "cpu")
    img, _ = s.read_upload(str(EXAMPLES_DIR / "ct_chest_lesions.png"))
    last = list(s.respond("Is there a lesion in the left lung?", [], img, None, 0.0, 1.0, 8))[-1]
    e = last.explanation
    assert e is not None and e.question_type == "CLOSED" and e.overlay.size == (224, 224)
    assert np.abs(np.asarray(e.overlay, dtype=np.int16) - np.asarray(model_view(tiny_tower, img), dtype=np.int16)).max() > 20
    html_ = confidence_html(e)
    assert f'aria-valuenow="{100 * e.probability:.0f}"' in html_ and "Alternatives:" in html_
    unsure = list(s.respond("Is there a lesion in the left lung?", [], img, None, 0.0, 1.0, 8, 1.0))[-1]
    assert unsure.explanation.abstained and unsure.chat[-1]["content"].startswith("not sure (the model's answer")
    assert "Not sure" in confidence_html(unsure.explanation)


def test_candidate_ranking_agrees_with_constrained_greedy_decoding(tmp_path):
    """On a trained model the candidates' most probable answer is the answer greedy decoding
    gives when restricted to the same set (DEMO=hard model: 223 of 223 closed test questions)."""
    from evaluation.runner import evaluate_split
    from model.checkpoint import load_model
    from tests.helpers import train_tiny_on_demo
    d = train_tiny_on_demo(tmp_path, seed=6, n_train=24, n_val=2, n_test=12, cache_dir="", epochs=4, val=False)
    evaluate_split(load_model(tmp_path / "out" / "medical_vlm_48.pth"), d / "medical_vqa_test.jsonl",
                   d / "medical_images", d / "medical_vqa_train.jsonl", tmp_path / "eval", torch.device("cpu"),
                   cache_dir=None, constrain="closed")
    rows = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "answer_probs" in r]
    agree = [max(r["answer_probs"], key=r["answer_probs"].get) == r["prediction_constrained"] for r in scored]
    assert len(scored) >= 20 and sum(agree) / len(agree) >= 0.9, f"{sum(agree)} of {len(agree)} agree"


def test_web_demo_answer_stands_when_its_explanation_fails(tokenizer, tiny_tower, tmp_path, monkeypatch):
    from model.checkpoint import save_checkpoint
    from webdemo.app import EXAMPLES_DIR, Session
    path = save_checkpoint(tmp_path / "medical_vlm_64.pth", make_tiny_model(tokenizer, tiny_tower, spread=0.1),
                           tokenizer, "sft", 0)
    s = Session([path], "cpu")
    img, _ = s.read_upload(str(EXAMPLES_DIR / "ct_chest_lesions.png"))

    def broken(*a, **k):
        raise RuntimeError("out of memory")
    monkeypatch.setattr("webdemo.app.explain", broken)
    replies = list(s.respond("Is there a lesion?", [], img, None, 0.0, 1.0, 8))
    last = replies[-1]
    assert last.explanation is None and last.chat[-1]["content"] == replies[-2].chat[-1]["content"] != ""
    assert "could not be computed" in last.error


def test_batched_scoring_equals_one_question_at_a_time(tokenizer, tiny_tower):
    from evaluation.explain import score_answer, score_answers
    model, prompts, feats, _ = _setup(tokenizer, tiny_tower)
    sets = {"CLOSED": ["Yes", "No"], "OPEN": ["Liver", "Left Lung", "CT", "2", "Heart"]}
    answers, kinds = ["Yes", "2", "Liver"], ["CLOSED", "OPEN", "OPEN"]
    together = score_answers(model, tokenizer, prompts, feats, answers, kinds, sets, chunk=3)
    for i in range(3):
        p, alts, over = score_answer(model, tokenizer, prompts[i], feats[i:i + 1], answers[i], kinds[i], sets)
        assert together[i][2] == over and together[i][0] == pytest.approx(p, rel=1e-4)
        assert [a for a, _ in together[i][1]] == [a for a, _ in alts]
