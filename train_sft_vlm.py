"""Stage 2: medical question answering (SFT), starting from the stage-1 model when it exists.

Run from any folder:
    python train_sft_vlm.py --epochs 4
    torchrun --nproc_per_node 2 train_sft_vlm.py --epochs 4           # several GPUs
Writes out/medical_vlm_{hidden}.pth (what eval_vlm.py --model_mode 1 and the web demo open).
All flags: --help.
"""
import sys

from trainer.cli import run

if __name__ == "__main__":
    sys.exit(run("sft", description=__doc__))
