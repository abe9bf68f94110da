"""Stage 1: align image features with the language model on captions of the training images,
with the box, verification and training questions the converter adds (docs/data.md).

Run from any folder (after convert_slake_dataset.py):
    python train_pretrain_vlm.py --epochs 4
    torchrun --nproc_per_node 2 train_pretrain_vlm.py --epochs 4      # several GPUs
Writes out/medical_pretrain_vlm_{hidden}.pth. All flags: --help.
"""
import sys

from trainer.cli import run

if __name__ == "__main__":
    sys.exit(run("pretrain", description=__doc__))
