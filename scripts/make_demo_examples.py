"""Regenerate the example images shipped with the web demo (webdemo/examples/).

Run from the repository root:
    python -m scripts.make_demo_examples
Synthetic images from the built-in demo generator (no patient data): two PNGs and one
DICOM file written with pydicom, so the demo can be tried without any download.
"""
from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dataset.demo import draw
from webdemo.app import EXAMPLES_DIR

EXAMPLES = {
    "ct_chest_lesions.png": dict(modality="CT", region="chest", lesions=2, side="Left", size="Large", noise_seed=1),
    "mri_head_normal.png": dict(modality="MRI", region="head", lesions=0, side=None, size=None, noise_seed=2),
}
DICOM = dict(modality="CT", region="abdomen", lesions=1, side="Right", size="Small", noise_seed=3)


def write_dicom(path, pixels: np.ndarray):
    """A minimal secondary-capture CT-like file: stored values 0..255 mapped to -1000..1040 HU
    with a soft-tissue window, so the demo exercises rescale and windowing."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["medvlm-demo"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Synthetic^Demo", "DEMO0001"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 8, -1000
    ds.WindowCenter, ds.WindowWidth = 20, 2040
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def main():
    EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    for name, params in EXAMPLES.items():
        draw(params).save(EXAMPLES_DIR / name)
    write_dicom(EXAMPLES_DIR / "ct_abdomen_lesion.dcm", np.asarray(draw(DICOM)))
    print(f"wrote {sorted(p.name for p in EXAMPLES_DIR.iterdir())}")


if __name__ == "__main__":
    main()
