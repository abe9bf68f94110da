"""Process-level helpers shared by the stage scripts: logging, device choice, seeding."""
from __future__ import annotations

import logging
import os
import random
import shutil
import sys

import numpy as np
import torch

from infra.errors import UserError
from infra.machine import busy_cores, cpu_threads, recent_busy_cores  # noqa: F401  (busy_cores re-exported)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_logging(level: int = logging.INFO):
    """Plain messages on stderr; under torchrun only rank 0 prints below WARNING."""
    logging.basicConfig(level=level if is_rank0() else logging.WARNING, format="%(message)s",
                        stream=sys.stderr, force=True)


class DeviceError(UserError, ValueError):
    pass


def nvidia_driver_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def configure_cuda() -> None:
    """Process-wide CUDA settings, applied wherever a CUDA device is picked (``pick_device``,
    torchrun's ``init_distributed``), so training, evaluation, the API and the web demo agree:

    - TF32 for the float32 matrix products that remain (the frozen tower's feature cache, fp32 runs);
    - no cuDNN attention. PyTorch picks it first on Hopper GPUs, and on an H200 (torch 2.11)
      batched evaluation, where every batch brings a new prompt width and every decode step a
      new key length, ran 6x slower with it: 5.5 s against 0.9 s for 1,061 questions of the
      104M model (scripts/gpu_check.py, part ``backends``). A 26M training epoch was 11 % slower
      (8.5 s against 7.6 s). SDPA then chooses among flash, memory-efficient and math.
      ``MEDVLM_CUDNN_ATTENTION=1`` leaves cuDNN attention on (to compare on another GPU or torch)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(os.environ.get("MEDVLM_CUDNN_ATTENTION", "0") == "1")


def pick_device(requested: str | None = None) -> torch.device:
    dev = _pick_device(requested)
    if dev.type == "cuda":
        configure_cuda()
    else:
        configure_cpu_threads()
    return dev


def configure_cpu_threads() -> None:
    """Sets torch's thread count from the free cores, unless OMP_NUM_THREADS says otherwise."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = recent_busy_cores()
    if load is None:
        if not hasattr(os, "getloadavg"):
            return
        load = os.getloadavg()[0]
    n = cpu_threads(cores, load)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        logging.getLogger(__name__).info("CPU: %d thread(s) (%.1f of %d cores busy with other work; "
                                         "OMP_NUM_THREADS overrides)", n, load, cores)


def _pick_device(requested: str | None) -> torch.device:
    if requested and requested != "auto":
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise DeviceError(f"--device {requested!r} is not a device: use auto, cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if nvidia_driver_present() and torch.version.cuda is None:
        logging.getLogger(__name__).warning(
            "\n" + "!" * 78 + "\n!! This machine has an NVIDIA driver but PyTorch %s is a CPU-only build: running "
            "on the CPU.\n!! Install the CUDA build (README, 'GPU install') to use the GPU.\n" + "!" * 78,
            torch.__version__)
    elif nvidia_driver_present():
        logging.getLogger(__name__).warning(
            "\n" + "!" * 78 + "\n!! This machine has an NVIDIA driver but CUDA is not usable by PyTorch "
            "(driver too old for CUDA %s?): running on the CPU.\n" + "!" * 78, torch.version.cuda)
    return torch.device("cpu")


def compute_dtype(flag: str, device: torch.device) -> torch.dtype:
    """The one precision policy, for training and every generation path. ``auto``: bfloat16
    on GPUs that compute it natively (Ampere and newer), float16 on older ones (with a
    GradScaler in training: emulated bf16 on T4/V100 would be slow), float32 on the CPU."""
    if flag == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[flag]


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_tty() -> bool:
    return sys.stderr.isatty()


class Progress:
    """A tqdm bar on a terminal; in a log file (stderr not a TTY) plain lines instead of
    carriage-return redraws: one every ``every`` updates (default: every 10 %) and at the end."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 every: int | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.enabled = enabled
        self.every = every or max(1, total // 10)
        self.postfix = ""
        self.bar = None
        if enabled and is_tty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            logging.getLogger("progress").info("%s: %d/%d %s%s", self.desc, self.n, self.total, self.unit,
                                               f" | {self.postfix}" if self.postfix else "")

    def set_postfix(self, text: str):
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def write(self, msg: str):
        """A line that stays (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            logging.getLogger("progress").info("%s", msg)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def progress(iterable, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True):
    """Iterates with a Progress (see there)."""
    total = len(iterable) if total is None else total
    p = Progress(total, desc, unit, enabled)
    try:
        for item in iterable:
            yield item
            p.update()
    finally:
        p.close()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The MedicalVLM inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
