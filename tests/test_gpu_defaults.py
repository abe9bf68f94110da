"""GPU defaults (issue #20), proven on the CPU: a SLAKE-sized epoch runs in at most four step
shapes, padding to those shapes changes no loss, the compiled step has no graph breaks and
compiles once per shape, the overlapped batch feed trains exactly like the plain loop, and
``--compile auto`` decides by device and run length."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import trainer.step as step_mod
from dataset.vqa_dataset import MODEL_INPUTS, Sample, collate, plan_shapes
from model.tokenization import IGNORE_INDEX, ChatEncoder
from tests.helpers import converted_demo, make_tiny_model, random_image
from trainer.cli import main as train_main
from trainer.config import TrainConfig, parse_train_args
from trainer.distributed import Dist
from trainer.losses import look_loss
from trainer.step import compile_choice, micro_batches, epoch_perm, shape_key

SLAKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slake"
needs_slake = pytest.mark.skipif(not SLAKE.is_dir(), reason="../shared/data/slake (real annotations) not present")
PATCHES = 196


def slake_samples(tokenizer, split="train", lang="en", look_every=3) -> list[Sample]:
    """The real SLAKE questions and answers of a split as training samples (one image each,
    196 patch tokens as with CLIP ViT-B/16), every ``look_every``-th with a --look_loss target."""
    enc = ChatEncoder(tokenizer, PATCHES)
    out = []
    for i, r in enumerate(q for q in json.loads((SLAKE / f"{split}.json").read_text()) if q["q_lang"] == lang):
        e = enc.encode([{"role": "user", "content": "<image>\n" + r["question"]},
                        {"role": "assistant", "content": str(r["answer"])}], 512)
        s = Sample(e.input_ids, e.labels, [i % 450], {"answer_type": r["answer_type"]})
        if i % look_every == 0:
            target = torch.zeros(PATCHES)
            target[(i % 180):(i % 180) + 8] = 1 / 8
            s.look = target
        out.append(s)
    return out


@needs_slake
@pytest.mark.parametrize("batch_size", [8, 16, 64])
def test_a_slake_sized_epoch_runs_in_at_most_four_step_shapes(batch_size, tokenizer):
    samples = slake_samples(tokenizer)
    assert len(samples) == 4919  # SLAKE's English training questions
    shapes = plan_shapes(samples, batch_size)
    assert len(shapes.widths) <= 4 and shapes.widths[-1] >= max(len(s.input_ids) for s in samples)
    cfg = TrainConfig(batch_size=batch_size)
    seen, plain = set(), set()
    for epoch in range(2):
        perm = epoch_perm(len(samples), 42, epoch)
        for step in range(len(samples) // batch_size):
            micro = [samples[i] for i in micro_batches(perm, step, cfg, Dist())[0].tolist()]
            batch = collate(micro, tokenizer.pad_token_id, 6400, 8, shapes)
            seen.add(shape_key([batch]))
            plain.add(shape_key([collate(micro, tokenizer.pad_token_id, 6400, 8)]))
            assert batch.n_targets == sum(t != IGNORE_INDEX for s in micro for t in s.labels)
    assert 1 <= len(seen) <= 4, f"{len(seen)} step shapes"
    assert len(plain) > 20  # without the plan nearly every step has its own shape


def _tiny_batch(tokenizer, lengths, looks):
    enc = ChatEncoder(tokenizer, PATCHES)
    out = []
    for i, (n, look) in enumerate(zip(lengths, looks)):
        e = enc.encode([{"role": "user", "content": "<image>\n" + "why " * n},
                        {"role": "assistant", "content": "Liver " * (1 + i % 3)}])
        s = Sample(e.input_ids, e.labels, [0], {})
        if look:
            s.look = torch.softmax(torch.randn(PATCHES, generator=torch.Generator().manual_seed(i)), 0)
        out.append(s)
    return out


@pytest.mark.parametrize("lengths,looks", [([2, 30, 7], [True, False, True]), ([5, 5], [False, False]),
                                           ([40, 1, 9, 3], [True, True, True, True])])
def test_padding_to_a_step_shape_changes_no_loss(lengths, looks, tokenizer, tiny_tower):
    """The padded batch gives the same summed token loss and the same look loss as the plain
    one, whatever share of its slots is padding."""
    torch.manual_seed(0)
    model = make_tiny_model(tokenizer, tiny_tower).train()
    samples = _tiny_batch(tokenizer, lengths, looks)
    feats = tiny_tower(tiny_tower.preprocess([random_image(0)])).expand(len(samples), -1, -1)
    shapes = plan_shapes(_tiny_batch(tokenizer, [1, 60, 20, 33, 2], [True] * 5), len(samples) + 2)
    results = []
    for plan in (None, shapes):
        b = collate(samples, tokenizer.pad_token_id, tiny_tower_image_id(model), 8, plan)
        out = model(b["input_ids"], feats, **{k: b[k] for k in MODEL_INPUTS if k in b}, return_logits=True)
        q, k = model.llm.layers[-1].self_attn.kept_qk
        look = look_loss(q, k, b["look_pos"], b["image_slots"], b["look_image"], b["look_target"], b["look_weight"]) \
            if "look_pos" in b else torch.zeros(())
        results.append((out.loss_sum.item(), b.n_targets, look.item(), tuple(b["input_ids"].shape), b["targets"].shape[0]))
    plain, padded = results
    assert padded[3][1] in shapes.widths and padded[4] == shapes.targets
    assert padded[1] == plain[1] and plain[4] == plain[1]
    assert padded[0] == pytest.approx(plain[0], rel=1e-5)
    assert padded[2] == pytest.approx(plain[2], rel=1e-5)
    if any(looks):
        assert plain[2] > 0


def tiny_tower_image_id(model):
    return model.config.image_token_id


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_compiled_step_has_no_graph_breaks_and_compiles_once_per_shape(moe, tokenizer, tiny_tower):
    """The whole forward (embedding, image merge, layers, answer logits, loss, the look head's
    queries and keys) is one graph per StepShapes width: 0 breaks, and no recompilation when
    the shapes repeat. aot_eager traces forward and backward as inductor would, without the
    C++ compile time."""
    torch._dynamo.reset()
    counters.clear()
    model = make_tiny_model(tokenizer, tiny_tower, use_moe=moe).train()
    runner = step_mod.compile_model(model, "on", None, backend="aot_eager")  # no C++ compile time
    pool = _tiny_batch(tokenizer, list(range(1, 80, 3)), [i % 2 == 0 for i in range(27)])
    shapes = plan_shapes(pool, 4)
    feats = tiny_tower(tiny_tower.preprocess([random_image(0)])).expand(4, -1, -1)
    rng = random.Random(0)
    keys = set()
    for _ in range(24):
        b = collate(rng.sample(pool, 4), tokenizer.pad_token_id, model.config.image_token_id, 8, shapes)
        keys.add(shape_key([b]))
        out = runner(b["input_ids"], feats, **{k: b[k] for k in MODEL_INPUTS if k in b}, return_logits=True)
        q, k = model.llm.layers[-1].self_attn.kept_qk
        loss = out.loss_sum / b.n_targets + out.aux_loss + look_loss(q, k, b["look_pos"], b["image_slots"], b["look_image"],
                                                b["look_target"], b["look_weight"])
        loss.backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == len(keys) <= 4
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return converted_demo(tmp_path_factory.mktemp("gpu_defaults"), 4, 16, 4, 3)


def _args(demo, out, *extra):
    return ["--vision_model", "random-tiny", "--hidden_size", "32", "--num_hidden_layers", "2",
            "--num_attention_heads", "4", "--num_key_value_heads", "2", "--device", "cpu", "--num_workers", "0",
            "--images_path", str(demo / "medical_images"), "--out_dir", str(out), "--cache_dir", "",
            "--data_path", str(demo / "medical_vqa_train.jsonl"), "--val_path", str(demo / "medical_vqa_validation.jsonl"),
            "--from_weight", "none", "--epochs", "2", "--batch_size", "4", "--log_interval", "1", *extra]


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "medical_vlm_32_metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_overlapped_batch_feed_trains_exactly_like_the_plain_loop(demo, tmp_path):
    assert train_main("sft", _args(demo, tmp_path / "plain", "--no-prefetch")) == 0
    assert train_main("sft", _args(demo, tmp_path / "overlap", "--prefetch")) == 0
    plain, overlap = _losses(tmp_path / "plain"), _losses(tmp_path / "overlap")
    assert len(plain) >= 6 and plain == overlap
    a = torch.load(tmp_path / "plain" / "medical_vlm_32.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "overlap" / "medical_vlm_32.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_training_run_logs_compile_time_apart(demo, tmp_path, monkeypatch, caplog):
    """--compile on through the stage script (aot_eager standing in for inductor): losses
    match the eager run, the step compiled once per shape, and the compile seconds are
    reported apart from the epoch's training seconds."""
    real = step_mod.compile_model

    def aot_eager(model, choice, cache_dir):
        return real(model, choice, cache_dir, backend="aot_eager")
    monkeypatch.setattr("trainer.step.compile_model", aot_eager)
    torch._dynamo.reset()
    counters.clear()
    import trainer.trainer as tr
    cfg_eager = parse_train_args("sft", _args(demo, tmp_path / "eager", "--compile", "off"))
    cfg_comp = parse_train_args("sft", _args(demo, tmp_path / "comp", "--compile"))
    assert cfg_comp.compile == "on"
    eager = tr.train(cfg_eager)
    with caplog.at_level("INFO", logger="train"):
        comp = tr.train(cfg_comp)
    assert eager["compile"] == "off" and comp["compile"] == "on"
    assert 1 <= comp["step_shapes"] <= 4
    assert comp["compile_seconds"][0] > 0 and comp["compile_seconds"][1] == 0  # compiled in the first epoch only
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] <= comp["step_shapes"] + 4  # + validation's shapes (eval mode)
    for (s1, l1), (s2, l2) in zip(_losses(tmp_path / "eager"), _losses(tmp_path / "comp")):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "comp" / "medical_vlm_32_metrics.jsonl").read_text().splitlines()]
    assert [r["compile_seconds"] > 0 for r in rows if "compile_seconds" in r] == [True, False]
    assert "compile: on (--compile on)" in caplog.text and "compiling)" in caplog.text
    torch._dynamo.reset()


@pytest.mark.parametrize("flag,device,steps,want", [
    ("auto", "cpu", 10_000, "off"), ("auto", "cuda", 100, "off"), ("auto", "cuda", 1228, "on"),
    ("on", "cpu", 5, "on"), ("graphs", "cpu", 5, "on"), ("graphs", "cuda", 5, "graphs"), ("off", "cuda", 10_000, "off")])
def test_compile_auto_decides_by_device_and_run_length(flag, device, steps, want):
    choice, why = compile_choice(TrainConfig(compile=flag), torch.device(device), steps)
    assert choice == want and why.startswith(f"--compile {flag}")


def test_compile_flag_takes_a_mode_or_nothing():
    assert parse_train_args("sft", []).compile == "auto"
    assert parse_train_args("sft", ["--compile"]).compile == "on"
    assert parse_train_args("sft", ["--compile", "graphs"]).compile == "graphs"
    assert TrainConfig(compile=True).compile == "on" and TrainConfig(compile=False).compile == "off"
    with pytest.raises(SystemExit):
        parse_train_args("sft", ["--compile", "fast"])


@pytest.mark.parametrize("fails_in", ["train", "eval"])
def test_a_compiler_failure_falls_back_to_the_eager_step(fails_in, demo, tmp_path, monkeypatch, capfd):
    """--compile auto compiles every long CUDA run: if the compiler fails (on the first training
    step, or on the first validation pass), the run goes on eager with a warning and trains
    exactly as --compile off would."""
    class Broken(torch.nn.Module):  # like torch.compile's wrapper: the model is its _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, *a, **k):
            if fails_in == "eval" and self.training:
                return self._orig_mod(*a, **k)
            raise RuntimeError("inductor: no working C++ compiler")
    monkeypatch.setattr("trainer.step.compile_model", lambda model, choice, cache_dir: Broken(model))
    assert train_main("sft", _args(demo, tmp_path / "eager", "--compile", "off")) == 0
    capfd.readouterr()
    assert train_main("sft", _args(demo, tmp_path / "broken", "--compile", "on")) == 0
    err = capfd.readouterr().err
    what = "the training step" if fails_in == "train" else "the validation pass"
    assert f"compiling {what} failed (RuntimeError: inductor: no working C++ compiler)" in err
    assert err.count("training and validation continue without compiling") == 1
    broken, eager = _losses(tmp_path / "broken"), _losses(tmp_path / "eager")
    assert [s for s, _ in broken] == [s for s, _ in eager]
    assert [loss for _, loss in broken] == pytest.approx([loss for _, loss in eager], rel=1e-5)  # padded shapes


@pytest.mark.parametrize("user_setting", [None, "torch-default", "/data/my_inductor_cache"])
def test_inductor_cache_goes_under_out_unless_the_user_chose_one(user_setting, tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    value = {None: None, "torch-default": default_cache_dir()}.get(user_setting, user_setting)
    if value is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", value)
    step_mod.compile_model(torch.nn.Linear(2, 2), "on", tmp_path / "out" / "compile_cache", backend="eager")
    import os
    want = user_setting if user_setting and user_setting.startswith("/data") else str(tmp_path / "out" / "compile_cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == want


def test_the_graphs_step_marks_iterations_and_trains_like_the_plain_one(tokenizer, tiny_tower, monkeypatch):
    """--compile graphs marks each iteration for CUDA graph trees (a no-op off CUDA); the step
    it runs computes the plain step's loss."""
    import trainer.step as tr
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    pool = _tiny_batch(tokenizer, [3, 9, 20, 5], [True, False, True, False])
    feats = type("F", (), {"get": staticmethod(lambda index: tiny_tower(tiny_tower.preprocess([random_image(0)]))
                                                .expand(len(index), -1, -1))})()
    losses = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = make_tiny_model(tokenizer, tiny_tower).train()
        cfg = TrainConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          accumulation_steps=2)
        params, opt, scaler = tr.make_optimizer(model, cfg, torch.device("cpu"), torch.float32)
        shapes = plan_shapes(pool, 2)
        batches = [collate(pool[:2], tokenizer.pad_token_id, model.config.image_token_id, 8, shapes),
                   collate(pool[2:], tokenizer.pad_token_id, model.config.image_token_id, 8, shapes)]
        runner = tr.compile_model(model, "on", None, backend="aot_eager")
        losses.append(float(tr.train_step(runner, model, batches, feats, opt, scaler, params, cfg, Dist(),
                                          torch.device("cpu"), torch.autocast("cpu", enabled=False), 1e-3,
                                          graphs=graphs)))
    assert calls == [1, 1]  # one mark per micro-batch, only in graphs mode
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch._dynamo.reset()


def test_prefetch_auto_is_off_on_the_cpu(demo, tmp_path, capfd):
    """--prefetch auto (no flag): the feed thread only where the host is otherwise idle (CUDA);
    on the CPU it would take cores from the step (docs/benchmarks.md)."""
    assert train_main("sft", _args(demo, tmp_path / "auto")) == 0
    out = capfd.readouterr()
    assert "batches built in the loop (--prefetch auto: off on cpu)" in out.err + out.out
    assert _losses(tmp_path / "auto")  # trained
    assert parse_train_args("sft", []).prefetch is None
    assert parse_train_args("sft", ["--prefetch"]).prefetch is True
    assert parse_train_args("sft", ["--no-prefetch"]).prefetch is False
