"""Training configuration: one dataclass, two stage presets, one flag parser.

The two stage scripts differ only in the preset they pass to ``parse_train_args``: the
data, the learning rate, what is frozen and which weights they start from.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields

from infra import flags
from model.config import DEFAULT_TOKENIZER, DEFAULT_VISION_MODEL, PROJECTORS, user_path

STAGES = ("pretrain", "sft")


DATA, MODEL, OPTIM, SCHEDULE, GROUNDING, HARDWARE, SAVING = (
    "data", "model", "optimisation", "learning-rate schedule", "grounding (where the answer looks; 0 = off)",
    "hardware", "saving and logging")
GROUP_ORDER = (DATA, MODEL, OPTIM, SCHEDULE, GROUNDING, HARDWARE, SAVING)  # --help's groups, in order


def flag(default, help: str, group: str, rule=None, choices: tuple | None = None, bare=None, path: str = ""):
    """One training flag, declared once beside its field: the default, its --help text and group, the
    rule its value must follow (infra.flags, on the command line and in code), its choices, what a bare
    ``--flag`` without a value means, and whether it is a path typed relative to where the user stands
    (``path='local'``; ``'remote'``: or a hub id)."""
    return field(default=default, metadata={"help": help, "group": group, "rule": rule, "choices": choices,
                                            "bare": bare, "path": path})


@dataclass
class TrainConfig:
    stage: str = field(default="sft", metadata={"flag": False})  # chosen by the stage script
    # data
    data_path: str = flag("dataset/medical_vqa_train.jsonl", "training JSONL (the data contract)", DATA,
                          path="local")
    val_path: str = flag("dataset/medical_vqa_validation.jsonl", "validation JSONL ('' = none)", DATA, path="local")
    images_path: str = flag("dataset/medical_images", "folder the 'image' paths are relative to", DATA, path="local")
    cache_dir: str = flag("dataset/cache", "where frozen vision features are cached ('' = memory only)", DATA,
                          path="local")
    feature_cache_gb: float = flag(4.0, "above this size features are computed per batch instead of cached", DATA,
                                   flags.non_negative_float)
    max_seq_len: int = flag(512, "longer samples lose question tokens (never answer or image tokens)", DATA,
                            flags.int_range(8))
    pack_questions: int = flag(1, "up to K questions about one image share its image tokens in one training "
                               "sequence (same loss as separate samples, far fewer tokens)", DATA, flags.positive_int)
    boxes_path: str = flag("auto", "organ/finding boxes per image for --look_loss; auto: medical_boxes.json beside "
                           "--data_path", DATA, path="local")
    # model
    hidden_size: int = flag(768, "512 (26M) or 768 (104M) for the MiniMind2 sizes", MODEL, flags.positive_int)
    num_hidden_layers: int = flag(16, "decoder layers: 8 (26M) or 16 (104M) for the MiniMind2 sizes", MODEL,
                                  flags.positive_int)
    num_attention_heads: int = flag(8, "attention heads (query)", MODEL, flags.positive_int)
    num_key_value_heads: int = flag(2, "key/value heads (grouped-query attention)", MODEL, flags.positive_int)
    use_moe: bool = flag(False, "MiniMind's mixture-of-experts feed-forward", MODEL)
    projector: str = flag("mlp", "mlp (LLaVA-1.5) or linear (MiniMind2-V)", MODEL, choices=PROJECTORS)
    vision_model: str = flag(DEFAULT_VISION_MODEL, "CLIP folder or hub id; 'random' / 'random-tiny' for offline "
                             "tests", MODEL, path="remote")
    tokenizer_path: str = flag(DEFAULT_TOKENIZER, "folder of the tokenizer files", MODEL, path="remote")
    from_weight: str = flag("none", "'none', 'pretrain' (this size's stage-1 checkpoint if present) or a "
                            "checkpoint path", MODEL, path="remote")
    from_llm: str = flag("", "MiniMind2 language-model weights to start from (use with --tokenizer_path)", MODEL,
                         path="local")
    freeze_llm: str = flag("none", "all | except_last | none | auto (all when --from_llm is given)", MODEL,
                           choices=("all", "except_last", "none", "auto"))
    # optimisation
    epochs: int = flag(4, "passes over the training data", OPTIM, flags.positive_int)
    batch_size: int = flag(16, "sequences per optimizer step and process", OPTIM, flags.positive_int)
    accumulation_steps: int = flag(1, "micro-batches summed into one optimizer step (a larger batch in the same "
                                   "memory)", OPTIM, flags.positive_int)
    learning_rate: float | None = flag(None, "peak learning rate; default: automatic per stage and start (from "
                                       "scratch 1e-3 for stage 1, 5e-4 for stage 2; from MiniMind2 weights 4e-4 "
                                       "and 1e-4)",
                                       OPTIM, flags.positive_float)
    weight_decay: float = flag(0.01, "AdamW weight decay of the matrices (norms and biases have none)", OPTIM,
                               flags.non_negative_float)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 = off)", OPTIM, flags.non_negative_float)
    # learning-rate schedule
    lr_schedule: str = flag("auto", "after the linear warm-up: cosine (decay to --min_lr_ratio over the whole "
                            "run), wsd (stable at the peak, linear decay to --min_lr_ratio over the last "
                            "--decay_ratio of the steps) or constant (the peak to the end; best for 16+ epochs "
                            "from scratch on the hard demo set); auto: wsd for stage 2 from scratch, cosine "
                            "otherwise", SCHEDULE, choices=("auto", "cosine", "wsd", "constant"))
    warmup_ratio: float = flag(0.05, "fraction of the steps of linear warm-up", SCHEDULE, flags.fraction_below_one)
    min_lr_ratio: float = flag(0.1, "the rate at the end of cosine/wsd decay, as a fraction of the peak", SCHEDULE,
                               flags.fraction)
    decay_ratio: float = flag(0.2, "wsd: the fraction of the steps, at the end, over which the rate decays",
                              SCHEDULE, flags.fraction)
    # grounding: on whenever the data has boxes; at the guide's 4 + 4 epochs it took the hard demo set's
    # closed questions from the prior to +26.5 / +26.9 (seeds 42 / 1; docs/learning.md)
    look_loss: float = flag(1.0, "weight of an attention-grounding loss: for questions naming organs/findings "
                            "boxed in their image, one attention head at the answer is trained to look at those "
                            "patches (uses medical_boxes.json when the data has one; 0 = off)", GROUNDING,
                            flags.non_negative_float)
    # twoway by default since 2026-12-04: at the guide's 4 + 4 epochs, three seeds, on the mean of three box-less traps
    # closed lead over the prior +15.6 against +14.5 for the nearest patch anywhere (removed, last at 88f56f9), accuracy
    # against the prior 74.2 % against 71.0 %, open 95.2 % against 94.7 %; changing-prior splits (seed 42) 58.8 %
    # against 48.4 % on the mean, the side questions of attribute-prior CP 26 / 26 against 5 / 26 (docs/learning.md)
    look_contrast: str = flag("twoway", "look targets for questions that name no box: twoway = the patches least "
                              "like the patches near the same place of the images its question text was answered "
                              "otherwise on, and where those images have what this one lacks (every question text "
                              "answered more than one way; no boxes needed, anatomy that moves a little is no "
                              "difference); none = only boxes", GROUNDING, choices=("none", "twoway"))
    # hardware
    device: str = flag("auto", "auto (CUDA if available, else CPU), cpu, cuda or cuda:N", HARDWARE)
    dtype: str = flag("auto", "auto | bfloat16 | float16 | float32", HARDWARE,
                      choices=("auto", "bfloat16", "float16", "float32"))  # auto: bf16 on CUDA, fp32 on CPU
    compile: str = flag("auto", "torch.compile the training step: on, graphs (also replayed as CUDA graphs, one "
                        "per batch shape), off, or auto (on for CUDA runs of 500+ steps; off on the CPU); a bare "
                        "--compile means on", HARDWARE, choices=("auto", "on", "graphs", "off"), bare="on")
    prefetch: bool | None = flag(None, "build the next step's batches on a worker thread while this step runs "
                                 "(default: on with CUDA, where the host is otherwise idle; off on the CPU, where "
                                 "the thread takes cores from the step)", HARDWARE)
    num_workers: int = flag(2, "image-loading processes while the feature cache is built", HARDWARE,
                            flags.non_negative_int)
    # saving and logging
    out_dir: str = flag("out", "where checkpoints, metrics and loss curves go", SAVING, path="local")
    save_interval: int = flag(0, "optimizer steps between checkpoints (0 = each epoch)", SAVING,
                              flags.non_negative_int)
    save_dtype: str = flag("float32", "precision of the weights checkpoint (bfloat16/float16 halve its size; "
                           "resume state stays float32)", SAVING, choices=("float32", "bfloat16", "float16"))
    resume: bool = flag(False, "continue from out/<name>_resume.pth", SAVING)
    stop_at_step: int = flag(0, "stop after this optimizer step without changing the schedule", SAVING,
                             flags.non_negative_int)
    seed: int = flag(42, "seed of initialisation, data order and every random choice", SAVING,
                     flags.non_negative_int)
    log_interval: int = flag(10, "optimizer steps between progress lines", SAVING, flags.positive_int)
    use_wandb: bool = flag(False, "also log to Weights & Biases", SAVING)
    wandb_project: str = flag("medical-vlm", "Weights & Biases project name", SAVING)
    # set by the trainer, not a flag: the language model started from MiniMind2 weights
    # (--from_llm here or in the run that wrote --from_weight); picks the automatic learning rate
    lm_pretrained: bool = field(default=False, metadata={"flag": False})

    def __post_init__(self):
        """The same rules as the command line (RULES), plus the ones that tie flags together."""
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        if isinstance(self.compile, bool):  # TrainConfig(compile=True) in code, as before --compile took a mode
            self.compile = "on" if self.compile else "off"
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise flags.FlagError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name, rule in RULES.items():
            if getattr(self, name) is not None:  # None: chosen automatically (learning_rate)
                setattr(self, name, flags.check_value(name, rule, getattr(self, name)))
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise flags.FlagError(
                f"--hidden_size {self.hidden_size} must split into --num_attention_heads "
                f"{self.num_attention_heads} heads of an even width (rotary embeddings rotate pairs), "
                "e.g. 512/8 or 768/8")
        if self.num_attention_heads % self.num_key_value_heads:
            raise flags.FlagError(f"--num_attention_heads {self.num_attention_heads} must be a multiple of "
                                  f"--num_key_value_heads {self.num_key_value_heads}")

    @property
    def frozen_llm(self) -> str:
        """What stays frozen: 'auto' trains the LM when it starts from random weights,
        since a frozen random LM cannot learn anything useful from aligned features."""
        if self.freeze_llm == "auto":
            return "all" if self.from_llm else "none"
        return self.freeze_llm

    def resolve_learning_rate(self, lm_pretrained: bool) -> str:
        """Fills in the automatic learning rate and schedule once the start is known; returns
        where the rate came from, for the log (``schedule_source`` says it for the schedule)."""
        self.lm_pretrained = lm_pretrained
        why = f"automatic for {self.stage} from {'MiniMind2 weights' if lm_pretrained else 'scratch'}"
        self.schedule_source = "--lr_schedule" if self.lr_schedule != "auto" else why
        self.lr_schedule = self.schedule
        if self.learning_rate is not None:
            return "--learning_rate"
        self.learning_rate = AUTO_LEARNING_RATE[(self.stage, "llm" if lm_pretrained else "scratch")]
        return why

    @property
    def schedule(self) -> str:
        """The learning-rate schedule after the warm-up, ``auto`` resolved for this start."""
        if self.lr_schedule != "auto":
            return self.lr_schedule
        return AUTO_SCHEDULE[(self.stage, "llm" if self.lm_pretrained else "scratch")]

    def to_dict(self) -> dict:
        return asdict(self)


# Peak learning rate per stage and start when --learning_rate is not given. A language model
# trained from scratch needs about 10x the rate of one that starts from MiniMind2 weights: at
# 1e-4 a scratch model answers closed questions from the question text alone (docs/learning.md,
# measured with scripts/sweep_hard.sh). The MiniMind2 rates are
# MiniMind-V's (stage 1 trains only the projector).
# Stage 2 from scratch continues a stage-1 model that has already trained on the task (stage 1's
# file ends with every training question), so it warms up to half stage 1's rate: re-warming to
# 1e-3 undid part of stage 1 (attribute-prior, seed 42: validation loss 0.32 after epoch 1, 0.51
# after epoch 2; at 5e-4 0.20, 0.16, 0.14, 0.12), and at 5e-4 the guide's 4 + 4 epochs gained on
# the mean of three seeds on both box-less traps (closed lead +9.3 vs +8.3 and -1.1 vs -2.7, open
# 91.3 vs 85.3 % and 94.6 vs 92.8 %) and on the hard set (docs/learning.md, Learning III).
AUTO_LEARNING_RATE = {("pretrain", "scratch"): 1e-3, ("pretrain", "llm"): 4e-4,
                      ("sft", "scratch"): 5e-4, ("sft", "llm"): 1e-4}

# Schedule after the warm-up when --lr_schedule is auto, per stage and start. Stage 2 from
# scratch learns the closed kind x side questions of the hard set late, in a jump that comes
# while the rate is still high or not at all. Warm-up-stable-decay keeps the rate up for 80 % of
# any run and still anneals at the end: on the hard set it beat cosine at 32 epochs (closed
# +29.6/+10.8 against +23.8/+7.6 at seeds 42/1) and matched it at the guide's 4 (+3.6 against
# +4.9). A constant rate was best at 32 epochs (+26.5/+20.2/+20.2) but fell below the prior at 4
# (-6.3): it is what scripts/demo.sh uses (docs/learning.md). Stage 1 and runs
# from MiniMind2 weights keep MiniMind-V's cosine (stage 1 was not swept; real weights were not).
AUTO_SCHEDULE = {("pretrain", "scratch"): "cosine", ("pretrain", "llm"): "cosine",
                 ("sft", "scratch"): "wsd", ("sft", "llm"): "cosine"}

PRESETS = {
    # stage 1: align image features with captions of the training images
    "pretrain": dict(stage="pretrain", data_path="dataset/medical_pretrain.jsonl", val_path="",
                     freeze_llm="auto", from_weight="none", epochs=4, batch_size=16),
    # stage 2: medical question answering, from the stage-1 model when it exists
    "sft": dict(stage="sft", data_path="dataset/medical_vqa_train.jsonl",
                val_path="dataset/medical_vqa_validation.jsonl", freeze_llm="none",
                from_weight="pretrain", epochs=4, batch_size=16),
}

FLAGS = [f for f in fields(TrainConfig) if f.metadata.get("flag", True)]
# views of the declarations above, by name
HELP = {f.name: f.metadata["help"] for f in FLAGS}
GROUPS = {title: [f.name for f in FLAGS if f.metadata["group"] == title] for title in GROUP_ORDER}
CHOICES = {f.name: list(f.metadata["choices"]) for f in FLAGS if f.metadata["choices"]}
RULES = {f.name: f.metadata["rule"] for f in FLAGS if f.metadata["rule"]}
PATH_FLAGS = {f.name: f.metadata["path"] for f in FLAGS if f.metadata["path"]}


def parse_train_args(stage: str, argv=None, description: str | None = None) -> TrainConfig:
    preset = {**asdict(TrainConfig()), **PRESETS[stage]}
    ap = flags.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {title: ap.add_argument_group(title) for title in GROUP_ORDER}
    for f in FLAGS:
        meta, default = f.metadata, preset[f.name]
        group = groups[meta["group"]]
        help_text = (meta["help"] + ("" if default is None else f" (default: {default!r})")).strip()
        if f.type in ("bool", bool, "bool | None"):
            group.add_argument(f"--{f.name}", default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            typ = meta["rule"] or {"int": int, "float": float, "str": str}[
                f.type if isinstance(f.type, str) else f.type.__name__]
            bare = {"nargs": "?", "const": meta["bare"]} if meta["bare"] is not None else {}
            group.add_argument(f"--{f.name}", type=typ, default=default, help=help_text, choices=CHOICES.get(f.name),
                               **bare)
    args = ap.parse_args(argv)
    for name, kind in PATH_FLAGS.items():  # typed paths count from the working directory, defaults from the repository
        setattr(args, name, user_path(getattr(args, name), preset[name], may_be_remote=kind == "remote"))
    try:
        return TrainConfig(stage=stage, **vars(args))
    except ValueError as exc:  # rules that tie several flags together
        ap.error(str(exc))
