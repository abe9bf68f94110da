"""The CUDA path, proven on the CPU (issue #11): torch.compile without graph breaks, a
training step and a decode step that never wait for the device, mixed precision that
matches float32, one precision policy for every generation path, and the save policy."""
from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import trainer.trainer as tr
from dataset.features import FeatureStore
from dataset.vqa_dataset import MODEL_INPUTS, PackedQuestions, Sample, collate
from evaluation.inference import answer_stream, generation_autocast
from model.checkpoint import load_model, save_checkpoint
from model.generation import GenerationConfig, generate, generate_steps
from model.language_model import KVCache
from infra.runtime import compute_dtype
from model.tokenization import ChatEncoder
from tests.helpers import converted_demo, make_tiny_model, random_image
from trainer.cli import main as train_main
from trainer.config import TrainConfig

TINY = ["--vision_model", "random-tiny", "--hidden_size", "32", "--num_hidden_layers", "2",
        "--num_attention_heads", "4", "--num_key_value_heads", "2", "--device", "cpu", "--num_workers", "0"]

# Ops that make the host wait for the GPU (on CUDA they copy a result back or need a size
# only the device knows). Boolean-mask indexing is `index` with a bool index (a hidden nonzero).
SYNC_OPS = {"nonzero", "masked_select", "_local_scalar_dense", "item", "is_nonzero", "equal", "unique", "_unique",
            "_unique2", "unique_consecutive", "unique_dim", "masked_scatter", "allclose", "argwhere"}


class SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            torch.is_tensor(t) and t.dtype == torch.bool for t in (args[1] or []))
        tensor_repeats = name == "repeat_interleave" and len(args) > 1 and torch.is_tensor(args[1])
        if name in SYNC_OPS or bool_index or tensor_repeats:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return converted_demo(tmp_path_factory.mktemp("gpu"), 2, 12, 3, 3)


def _samples(enc, lengths):
    out = []
    for i, n in enumerate(lengths):
        e = enc.encode([{"role": "user", "content": "<image>\n" + "why " * n},
                        {"role": "assistant", "content": "Liver " * (1 + i % 3)}])
        out.append(Sample(e.input_ids, e.labels, [0], {}))
    return out


def test_collate_builds_host_indices_and_buckets(tokenizer):
    enc = ChatEncoder(tokenizer, 196)
    samples = _samples(enc, [2, 30, 7])
    b = collate(samples, tokenizer.pad_token_id, enc.image_id, pad_multiple=64)
    assert b["input_ids"].shape[1] % 64 == 0
    flat_ids, flat_labels = b["input_ids"].view(-1), b["labels"].view(-1)
    width = b["input_ids"].shape[1]
    assert torch.equal(flat_ids[b["image_slots"]], torch.full((3 * 196,), enc.image_id))
    n_answer = sum(1 for s in samples for t in s.labels if t != -100)
    assert b["target_pos"].shape[0] == b["targets"].shape[0] == n_answer
    assert torch.equal(flat_labels[b["target_pos"] + 1], b["targets"])  # next token of each position
    assert not (b["target_pos"] % width == width - 1).any()


def test_compile_has_no_graph_breaks(tokenizer, tiny_tower):
    """--compile: one graph per layer stack (a few shapes thanks to bucketing), no breaks,
    for training and for generation. The eager backend checks tracing without the C++
    compile time; inductor sees the same graphs."""
    torch._dynamo.reset()
    counters.clear()
    model = make_tiny_model(tokenizer, tiny_tower).train()
    model.llm.compile(backend="eager")
    enc = ChatEncoder(tokenizer, 196)
    feats = tiny_tower(tiny_tower.preprocess([random_image(0)]))
    for lengths in ([2, 5], [30, 3], [70, 1], [3, 3, 3], [100, 2], [4]):
        b = collate(_samples(enc, lengths), tokenizer.pad_token_id, enc.image_id, pad_multiple=64)
        out = model(b["input_ids"], feats.expand(len(lengths), -1, -1), **{k: b[k] for k in MODEL_INPUTS if k in b})
        loss, n, aux = out.loss_sum, out.n_targets, out.aux_loss
        (loss / n + aux).backward()
    assert dict(counters["graph_break"]) == {}
    train_graphs = counters["stats"]["unique_graphs"]
    assert 1 <= train_graphs <= 4
    model.eval()
    prompts = [enc.encode([{"role": "user", "content": "<image>\n" + "what " * k}], add_generation_prompt=True).input_ids
               for k in (1, 4)]
    generate(model, prompts, feats.expand(2, -1, -1), GenerationConfig(max_new_tokens=6),
             model.config.eos_token_id, model.config.pad_token_id)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] - train_graphs <= 3  # prefill + decode shapes
    torch._dynamo.reset()


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_train_and_decode_steps_never_wait(moe, packed, tokenizer, tiny_tower, tmp_path):
    model = make_tiny_model(tokenizer, tiny_tower, use_moe=moe).train()
    enc = ChatEncoder(tokenizer, 196)
    random_image(0).save(tmp_path / "a.png")
    feats = FeatureStore(tiny_tower, [tmp_path / "a.png"], "cpu", None)
    samples = _samples(enc, [2, 5, 9, 4])
    if packed:
        data = type("D", (), {"samples": samples, "path": tmp_path})()
        for s in samples:
            s.record = {"conversations": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]}
        pq = PackedQuestions(data, enc.image_id, k=2, seed=0)
        samples = pq.epoch_samples(0)
    half = len(samples) // 2
    batches = [collate(samples[:half], tokenizer.pad_token_id, enc.image_id, 8),
               collate(samples[half:], tokenizer.pad_token_id, enc.image_id, 8)]
    cfg = TrainConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      accumulation_steps=2)
    params, opt, scaler = tr.make_optimizer(model, cfg, torch.device("cpu"), torch.float32)
    with SyncRecorder() as rec:
        loss = tr.train_step(model, model, batches, feats, opt, scaler, params, cfg, tr.Dist(), torch.device("cpu"),
                             torch.autocast("cpu", enabled=False), 1e-3)
    assert rec.ops == [], f"the training step waits on the device: {rec.ops}"
    assert torch.isfinite(loss)
    model.eval()
    prompt = enc.encode([{"role": "user", "content": "<image>\nwhat"}], add_generation_prompt=True).input_ids
    steps = generate_steps(model, [prompt, prompt[3:]], feats.get(torch.tensor([0, 0])),
                           GenerationConfig(max_new_tokens=20), -5, tokenizer.pad_token_id, check_every=8)
    next(steps)  # the prefill may look up image slots; the decode steps after it may not
    with SyncRecorder() as rec:
        for _ in range(7):
            next(steps)
    assert rec.ops == [], f"a decode step waits on the device: {rec.ops}"
    with SyncRecorder() as rec:
        for _ in range(8):
            next(steps)
    assert len(rec.ops) == 1  # the one allowed "has every row finished?" check per 8 tokens
    steps.close()


def test_batch_without_images_still_trains_the_projector(tokenizer, tiny_tower):
    model = make_tiny_model(tokenizer, tiny_tower).train()
    enc = ChatEncoder(tokenizer, 196)
    e = enc.encode([{"role": "user", "content": "no image here"}, {"role": "assistant", "content": "ok"}])
    b = collate([Sample(e.input_ids, e.labels, [], {})], tokenizer.pad_token_id, enc.image_id)
    loss = model(b["input_ids"], None, **{k: b[k] for k in MODEL_INPUTS if k in b}).loss_sum
    loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())  # DDP needs a gradient for each


def _run(data, out, dtype):
    args = list(TINY) + ["--images_path", str(data / "medical_images"), "--out_dir", str(out), "--cache_dir", "",
                         "--data_path", str(data / "medical_vqa_train.jsonl"), "--val_path", "",
                         "--from_weight", "none", "--epochs", "1", "--batch_size", "4", "--log_interval", "1",
                         "--learning_rate", "2e-3", "--dtype", dtype]
    assert train_main("sft", args) == 0
    rows = [json.loads(line) for line in (out / "medical_vlm_32_metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _smooth(curve: list[float], window: int) -> list[float]:
    return [sum(curve[i:i + window]) / window for i in range(len(curve) - window + 1)]


def test_mixed_precision_training_matches_float32(demo, tmp_path):
    ref = _run(demo, tmp_path / "f32", "float32")
    # float16 trains with a GradScaler, which skips a step whose gradients overflow while it
    # calibrates its scale: afterwards the curve runs about one step behind, so it is compared as a
    # 5-step moving average (per step, one batch's loss against the next one's: up to 6.1 % seen
    # with --look_contrast twoway; averaged 4.8 %)
    for dtype, tol, window in (("bfloat16", 0.01, 1), ("float16", 0.06, 5)):
        got = _run(demo, tmp_path / dtype, dtype)
        assert len(got) == len(ref) >= 20
        # float16 may skip its first step (the look loss's gradients overflow the initial scale)
        same = 4 if dtype == "bfloat16" else 1
        assert got[:same] == pytest.approx(ref[:same], rel=1e-3), dtype
        assert _smooth(got, window) == pytest.approx(_smooth(ref, window), rel=tol), dtype
        assert got != ref and got[-1] < got[0] - 1  # it really ran in lower precision, and learned


def test_one_precision_policy(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert compute_dtype("auto", cuda) == torch.float16  # emulated bf16 only (T4, V100): fp16 + GradScaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert compute_dtype("auto", cuda) == torch.bfloat16
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert generation_autocast("cpu").fast_dtype == torch.float32 or not generation_autocast("cpu")._enabled


@pytest.mark.parametrize("env, cudnn", [(None, False), ("0", False), ("1", True)])
def test_picking_a_cuda_device_turns_cudnn_attention_off(monkeypatch, env, cudnn):
    """On an H200, cuDNN attention made batched evaluation 6x slower (a new plan per shape):
    every path that picks a CUDA device turns it off; MEDVLM_CUDNN_ATTENTION=1 keeps it."""
    from infra import runtime
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32)
    if env is None:
        monkeypatch.delenv("MEDVLM_CUDNN_ATTENTION", raising=False)
    else:
        monkeypatch.setenv("MEDVLM_CUDNN_ATTENTION", env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        torch.backends.cuda.enable_cudnn_sdp(not cudnn)
        assert runtime.pick_device("auto").type == "cuda"
        assert torch.backends.cuda.cudnn_sdp_enabled() is cudnn
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert runtime.pick_device("cpu").type == "cpu"
        assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU run changes nothing
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1], before[2]


def test_kv_cache_is_allocated_in_the_compute_dtype(tokenizer, tiny_tower, monkeypatch):
    model = make_tiny_model(tokenizer, tiny_tower)
    seen = []
    real = KVCache.__init__

    def spy(self, config, b, n, device, dtype):
        seen.append(dtype)
        real(self, config, b, n, device, dtype)
    monkeypatch.setattr(KVCache, "__init__", spy)
    feats = tiny_tower(tiny_tower.preprocess([random_image(0)]))
    enc = ChatEncoder(tokenizer, 196)
    prompt = enc.encode([{"role": "user", "content": "<image>\nwhat"}], add_generation_prompt=True).input_ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        list(generate_steps(model, [prompt], feats, GenerationConfig(max_new_tokens=3), -5, 0))
    list(generate_steps(model, [prompt], feats, GenerationConfig(max_new_tokens=3), -5, 0))
    assert seen == [torch.bfloat16, torch.float32]


def test_single_question_and_batched_eval_agree(tokenizer, tiny_tower, tmp_path):
    path = save_checkpoint(tmp_path / "m.pth", make_tiny_model(tokenizer, tiny_tower, spread=0.15), tokenizer, "sft", 0)
    ckpt = load_model(path, vision_model="random-tiny")
    images = [random_image(i) for i in range(3)]
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
    feats = FeatureStore(ckpt.model.vision_tower, [tmp_path / f"{i}.png" for i in range(3)], "cpu", None)
    enc = ChatEncoder(tokenizer, ckpt.config.image_tokens)
    questions = ["Which organ is abnormal?", "Is this normal?", "What modality is used to take this image?"]
    prompts = [enc.encode([{"role": "user", "content": "<image>\n" + q}], add_generation_prompt=True).input_ids
               for q in questions]
    cfg = GenerationConfig(max_new_tokens=8)
    with generation_autocast("cpu"):
        batched = generate(ckpt.model, prompts, feats.get(torch.arange(3)), cfg, ckpt.config.eos_token_id,
                           ckpt.config.pad_token_id)
    from dataset.images import load_image
    for i, q in enumerate(questions):
        single = list(answer_stream(ckpt, [load_image(tmp_path / f"{i}.png")], [], q, cfg))
        assert (single[-1] if single else "").strip() == tokenizer.decode(batched[i], skip_special_tokens=True).strip()
    assert len({tuple(b) for b in batched}) > 1  # varied answers: the comparison can fail


def test_feature_fallback_ignores_autocast(tiny_tower, tmp_path):
    paths = []
    for i in range(3):
        random_image(i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    cached = FeatureStore(tiny_tower, paths, "cpu", None)
    per_batch = FeatureStore(tiny_tower, paths, "cpu", None, budget_gb=0)
    idx = torch.tensor([2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(per_batch.get(idx), cached.get(idx))


def test_resume_state_only_at_save_interval_and_end(demo, tmp_path, monkeypatch):
    written = []
    import trainer.checkpointing as ck
    real = ck.atomic_save
    monkeypatch.setattr(ck, "atomic_save", lambda obj, path: written.append(path.name) or real(obj, path))
    args = list(TINY) + ["--images_path", str(demo / "medical_images"), "--out_dir", str(tmp_path), "--cache_dir", "",
                         "--data_path", str(demo / "medical_vqa_train.jsonl"), "--val_path", "",
                         "--from_weight", "none", "--epochs", "3", "--batch_size", "8"]
    assert train_main("sft", args) == 0
    assert written == ["medical_vlm_32_resume.pth"]  # 3 epochs, one resume state: at the end
    written.clear()
    steps = json.loads((tmp_path / "medical_vlm_32_metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert train_main("sft", args + ["--save_interval", "2"]) == 0
    assert len(written) == steps // 2 + (steps % 2 != 0)


def test_torchrun_with_cuda_requested_but_missing_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(tr.TrainingError, match="--device cpu"):
        tr.init_distributed("cuda")


def test_masked_attention_uses_all_heads_not_gqa(tokenizer, tiny_tower, monkeypatch):
    """With a mask, K/V are expanded to every head so SDPA may pick the memory-efficient
    kernel (it refuses enable_gqa); results equal the GQA path."""
    import model.language_model as lm
    calls = []
    real = lm.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((k.shape[1] == q.shape[1], kw.get("enable_gqa", False), kw.get("attn_mask") is not None))
        return real(q, k, v, **kw)
    monkeypatch.setattr(lm.F, "scaled_dot_product_attention", spy)
    model = make_tiny_model(tokenizer, tiny_tower, spread=0.1)
    x = torch.randn(1, 9, 64)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    a = model.llm(x, attn_mask=causal)
    b = model.llm(x)
    assert torch.allclose(a, b, atol=1e-5)
    assert all(full and not gqa for full, gqa, masked in calls if masked)
    assert any(gqa for _, gqa, masked in calls if not masked)


@pytest.mark.slow
def test_gpu_check_script_runs_its_steps_in_smoke_mode(tmp_path):
    """scripts/gpu_check.py does on the CPU, tiny, what it does on a GPU: so the one GPU
    call a session gets is not spent on a typo."""
    from scripts.gpu_check import PARTS, main
    out = tmp_path / "gpu_check.json"
    assert main(["--smoke", "--out", str(out), "--only", *PARTS]) == 0  # backends runs only when named
    r = json.loads(out.read_text())
    assert r["sync"]["syncs_in_step"] == 0 and r["sync"]["loss_finite"]
    (run,) = r["train"].values()
    assert run["epoch_seconds"] > 0 and run["tokens_per_s"] > 0
    assert r["eval"]["questions"] == 64 and r["eval"]["generation_seconds"] > 0
    p = r["pipeline"]
    assert "error" not in p and len(p["sft_epoch_seconds"]) == 1 and p["questions"] > 0
    assert sorted(p["seconds"]) == ["convert", "eval", "pretrain", "sft"] and p["guide_seconds"] > 0
    assert r["attention"]["causal"]["kernels"] and r["attention"]["masked"]["kernels"]
    assert r["profile"]["eager"]["aten_ops_per_step"] > 100 and r["profile"]["eager"]["wall_ms_per_step"] > 0
    assert sorted(r["memory"]["peak_gb"]) == ["b16 eager", "b32 eager", "b8 eager"]  # numbers on CUDA only
    assert sorted(r["backends"]) == ["26M b16 eager, cudnn attention", "26M b16 eager, default",
                                     "eval, cudnn attention", "eval, default"]
    assert all("error" not in v for v in r["backends"].values())


def test_gpu_check_budget_skips_what_no_longer_fits(tmp_path):
    """A lent GPU's minutes are few: --budget_s cuts each part to the time left, and parts that
    no longer fit are marked skipped instead of running past the call's limit."""
    from scripts.gpu_check import main
    out = tmp_path / "gpu_check.json"
    assert main(["--smoke", "--out", str(out), "--budget_s", "5", "--only", "sync", "eval", "pipeline"]) == 0
    r = json.loads(out.read_text())
    assert r["sync"]["error"].startswith("skipped") and r["eval"]["error"].startswith("skipped")
    assert r["pipeline"]["error"].startswith("skipped") and r["train"] == {} and r["profile"] == {}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_autocast_step_casts_each_activation_once_per_layer(tokenizer, tiny_tower, tmp_path):
    """The default GPU step is launch-bound (27.9 ms wall, 6.8 ms GPU work on an H200): every
    kernel counts. Under bf16 autocast a decoder layer may cast only its 7 weights and their
    gradients, the normed activation once for attention and once for the MLP, and attention's
    output and the MLP product, forward and backward (20). Before RMSNorm returned the matmul
    dtype and RoPE ran in it, q, k and v each re-cast the same activation: 34 per layer."""
    random_image(0).save(tmp_path / "a.png")
    feats = FeatureStore(tiny_tower, [tmp_path / "a.png"], "cpu", None)
    enc = ChatEncoder(tokenizer, 196)
    batch = collate(_samples(enc, [2, 5, 9, 4]), tokenizer.pad_token_id, enc.image_id, 8)
    casts = {}
    for layers in (1, 2):
        model = make_tiny_model(tokenizer, tiny_tower, num_hidden_layers=layers).train()
        cfg = TrainConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
        params, opt, scaler = tr.make_optimizer(model, cfg, torch.device("cpu"), torch.bfloat16)
        step = lambda: tr.train_step(model, model, [batch], feats, opt, scaler, params, cfg, tr.Dist(),  # noqa: E731
                                     torch.device("cpu"), torch.autocast("cpu", dtype=torch.bfloat16), 1e-3)
        step()  # optimizer state
        with OpCounter() as ops:
            assert torch.isfinite(step())
        casts[layers] = ops.counts.get("aten._to_copy", 0)
    assert casts[2] - casts[1] <= 20, f"{casts[2] - casts[1]} casts per decoder layer"
