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


@dataclass
class TrainConfig:
    stage: str = "sft"
    # data
    data_path: str = "dataset/medical_vqa_train.jsonl"
    val_path: str = "dataset/medical_vqa_validation.jsonl"
    images_path: str = "dataset/medical_images"
    cache_dir: str = "dataset/cache"
    feature_cache_gb: float = 4.0
    max_seq_len: int = 512
    pack_questions: int = 1     # >1: up to this many questions share one image prefix per sequence
    boxes_path: str = "auto"    # organ/finding boxes (dataset/boxes.py); auto: medical_boxes.json beside --data_path
    # model
    hidden_size: int = 768
    num_hidden_layers: int = 16
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    use_moe: bool = False
    projector: str = "mlp"
    vision_model: str = DEFAULT_VISION_MODEL
    tokenizer_path: str = DEFAULT_TOKENIZER
    from_weight: str = "none"   # "none", "pretrain" (stage-1 output if present) or a checkpoint path
    from_llm: str = ""          # MiniMind2 LLM weights (llm_512.pth / llm_768.pth)
    freeze_llm: str = "none"    # "all", "except_last", "none" or "auto" (all when from_llm is given)
    # optimisation
    epochs: int = 4
    batch_size: int = 16
    accumulation_steps: int = 1
    learning_rate: float | None = None  # None: AUTO_LEARNING_RATE for this stage and start
    min_lr_ratio: float = 0.1
    lr_schedule: str = "auto"   # after the warm-up: cosine | wsd | constant; auto: AUTO_SCHEDULE
    decay_ratio: float = 0.2    # wsd: the last fraction of the steps, where the rate decays linearly
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    # Learning II levers (trainer/losses.py); 0 = off
    # weight of the attention-grounding loss, on whenever the data has boxes: at the guide's 4 + 4 epochs
    # it took the hard demo set's closed questions from the prior to +26.5 / +26.9 (seeds 42 / 1; docs/learning.md)
    look_loss: float = 1.0
    dtype: str = "auto"         # auto: bfloat16 on CUDA (float16 if unsupported), float32 on CPU
    compile: str = "auto"       # auto | on | graphs | off (trainer/step.py compile_choice)
    prefetch: bool | None = None  # next step's batches built on a thread; None (auto): on CUDA only
    save_dtype: str = "float32"  # weights checkpoint precision; the resume state is always float32
    # run
    out_dir: str = "out"
    device: str = "auto"
    num_workers: int = 2
    seed: int = 42
    log_interval: int = 10
    save_interval: int = 0      # optimizer steps between checkpoints; 0 = at the end of each epoch
    resume: bool = False
    stop_at_step: int = 0       # stop after this optimizer step (schedule unchanged); 0 = run to the end
    use_wandb: bool = False
    wandb_project: str = "medical-vlm"
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
AUTO_LEARNING_RATE = {("pretrain", "scratch"): 1e-3, ("pretrain", "llm"): 4e-4,
                      ("sft", "scratch"): 1e-3, ("sft", "llm"): 1e-4}

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

PATH_FLAGS = ("data_path", "val_path", "images_path", "cache_dir", "boxes_path", "tokenizer_path", "vision_model",
              "from_weight", "from_llm", "out_dir")
REMOTE_FLAGS = ("vision_model", "from_weight", "tokenizer_path")  # may also be hub ids

# --help groups, in order; every flag is in exactly one (a test checks it)
GROUPS = {
    "data": ["data_path", "val_path", "images_path", "cache_dir", "feature_cache_gb", "max_seq_len", "pack_questions",
             "boxes_path"],
    "model": ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "use_moe", "projector",
              "vision_model", "tokenizer_path", "from_weight", "from_llm", "freeze_llm"],
    "optimisation": ["epochs", "batch_size", "accumulation_steps", "learning_rate", "weight_decay", "grad_clip"],
    "learning-rate schedule": ["lr_schedule", "warmup_ratio", "min_lr_ratio", "decay_ratio"],
    "grounding (where the answer looks; 0 = off)": ["look_loss"],
    "hardware": ["device", "dtype", "compile", "prefetch", "num_workers"],
    "saving and logging": ["out_dir", "save_interval", "save_dtype", "resume", "stop_at_step", "seed", "log_interval",
                           "use_wandb", "wandb_project"],
}

HELP = {
    "epochs": "passes over the training data", "batch_size": "sequences per optimizer step and process",
    "accumulation_steps": "micro-batches summed into one optimizer step (a larger batch in the same memory)",
    "weight_decay": "AdamW weight decay of the matrices (norms and biases have none)",
    "grad_clip": "clip the gradient norm to this (0 = off)", "warmup_ratio": "fraction of the steps of linear warm-up",
    "min_lr_ratio": "the rate at the end of cosine/wsd decay, as a fraction of the peak",
    "num_hidden_layers": "decoder layers: 8 (26M) or 16 (104M) for the MiniMind2 sizes",
    "num_attention_heads": "attention heads (query)", "num_key_value_heads": "key/value heads (grouped-query attention)",
    "use_moe": "MiniMind's mixture-of-experts feed-forward", "tokenizer_path": "folder of the tokenizer files",
    "device": "auto (CUDA if available, else CPU), cpu, cuda or cuda:N",
    "num_workers": "image-loading processes while the feature cache is built", "out_dir": "where checkpoints, "
    "metrics and loss curves go", "seed": "seed of initialisation, data order and every random choice",
    "log_interval": "optimizer steps between progress lines", "use_wandb": "also log to Weights & Biases",
    "wandb_project": "Weights & Biases project name",
    "data_path": "training JSONL (the data contract)", "val_path": "validation JSONL ('' = none)",
    "images_path": "folder the 'image' paths are relative to",
    "cache_dir": "where frozen vision features are cached ('' = memory only)",
    "feature_cache_gb": "above this size features are computed per batch instead of cached",
    "max_seq_len": "longer samples lose question tokens (never answer or image tokens)",
    "pack_questions": "up to K questions about one image share its image tokens in one training sequence "
                      "(same loss as separate samples, far fewer tokens)",
    "hidden_size": "512 (26M) or 768 (104M) for the MiniMind2 sizes",
    "projector": "mlp (LLaVA-1.5) or linear (MiniMind2-V)",
    "vision_model": "CLIP folder or hub id; 'random' / 'random-tiny' for offline tests",
    "from_weight": "'none', 'pretrain' (this size's stage-1 checkpoint if present) or a checkpoint path",
    "from_llm": "MiniMind2 language-model weights to start from (use with --tokenizer_path)",
    "freeze_llm": "all | except_last | none | auto (all when --from_llm is given)",
    "dtype": "auto | bfloat16 | float16 | float32",
    "save_interval": "optimizer steps between checkpoints (0 = each epoch)",
    "resume": "continue from out/<name>_resume.pth",
    "stop_at_step": "stop after this optimizer step without changing the schedule",
    "compile": "torch.compile the training step: on, graphs (also replayed as CUDA graphs, one per batch shape), "
               "off, or auto (on for CUDA runs of 500+ steps; off on the CPU); a bare --compile means on",
    "prefetch": "build the next step's batches on a worker thread while this step runs (default: on with CUDA, "
                "where the host is otherwise idle; off on the CPU, where the thread takes cores from the step)",
    "learning_rate": "peak learning rate; default: automatic per stage and start (1e-3 from scratch; 4e-4 "
                     "for stage 1 and 1e-4 for stage 2 from MiniMind2 weights)",
    "lr_schedule": "after the linear warm-up: cosine (decay to --min_lr_ratio over the whole run), wsd "
                   "(stable at the peak, linear decay to --min_lr_ratio over the last --decay_ratio of the "
                   "steps) or constant (the peak to the end; best for 16+ epochs from scratch on the hard demo set); "
                   "auto: wsd for stage 2 from scratch, cosine otherwise",
    "decay_ratio": "wsd: the fraction of the steps, at the end, over which the rate decays",
    "boxes_path": "organ/finding boxes per image for --look_loss; auto: medical_boxes.json beside --data_path",
    "look_loss": "weight of an attention-grounding loss: for questions naming organs/findings boxed in their image, "
                 "one attention head at the answer is trained to look at those patches (uses medical_boxes.json "
                 "when the data has one; 0 = off)",
    "save_dtype": "precision of the weights checkpoint (bfloat16/float16 halve its size; resume state stays float32)",
}


CHOICES = {"freeze_llm": ["all", "except_last", "none", "auto"], "projector": list(PROJECTORS),
           "dtype": ["auto", "bfloat16", "float16", "float32"], "save_dtype": ["float32", "bfloat16", "float16"],
           "lr_schedule": ["auto", "cosine", "wsd", "constant"], "compile": ["auto", "on", "graphs", "off"]}
BARE = {"compile": "on"}  # a flag given without a value (the old boolean --compile)

# Allowed range of every numeric flag (argparse ``type=`` and TrainConfig.__post_init__).
RULES = {
    "feature_cache_gb": flags.non_negative_float, "max_seq_len": flags.int_range(8),
    "pack_questions": flags.positive_int, "hidden_size": flags.positive_int,
    "num_hidden_layers": flags.positive_int, "num_attention_heads": flags.positive_int,
    "num_key_value_heads": flags.positive_int, "epochs": flags.positive_int, "batch_size": flags.positive_int,
    "accumulation_steps": flags.positive_int, "learning_rate": flags.positive_float,
    "min_lr_ratio": flags.fraction, "decay_ratio": flags.fraction, "weight_decay": flags.non_negative_float,
    "warmup_ratio": flags.fraction_below_one, "grad_clip": flags.non_negative_float,
    "num_workers": flags.non_negative_int, "seed": flags.non_negative_int, "log_interval": flags.positive_int,
    "save_interval": flags.non_negative_int, "stop_at_step": flags.non_negative_int,
    "look_loss": flags.non_negative_float,
}


def parse_train_args(stage: str, argv=None, description: str | None = None) -> TrainConfig:
    preset = {**asdict(TrainConfig()), **PRESETS[stage]}
    ap = flags.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for title, names in GROUPS.items():
        group = ap.add_argument_group(title)
        groups.update(dict.fromkeys(names, group))
    for f in fields(TrainConfig):
        if f.name == "stage" or not f.metadata.get("flag", True):
            continue
        default = preset[f.name]
        group = groups[f.name]
        help_text = (HELP.get(f.name, "") + ("" if default is None else f" (default: {default!r})")).strip()
        if f.type in ("bool", bool, "bool | None"):
            group.add_argument(f"--{f.name}", default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            typ = RULES.get(f.name) or {"int": int, "float": float, "str": str}[
                f.type if isinstance(f.type, str) else f.type.__name__]
            bare = {"nargs": "?", "const": BARE[f.name]} if f.name in BARE else {}
            group.add_argument(f"--{f.name}", type=typ, default=default, help=help_text, choices=CHOICES.get(f.name),
                               **bare)
    args = ap.parse_args(argv)
    for name in PATH_FLAGS:  # typed paths count from the working directory, defaults from the repository
        setattr(args, name, user_path(getattr(args, name), preset[name], may_be_remote=name in REMOTE_FLAGS))
    try:
        return TrainConfig(stage=stage, **vars(args))
    except ValueError as exc:  # rules that tie several flags together
        ap.error(str(exc))
