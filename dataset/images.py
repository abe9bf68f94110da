"""The one image loader, used by the converter, training, evaluation and the web demo.

PNG/JPEG (any Pillow format) through Pillow and DICOM through pydicom, from a path or from
bytes, with the same limits everywhere: the whole image is decoded (a truncated file fails
here, not in the middle of training) and images above MAX_PIXELS are refused. Every image
comes back as 8-bit grey ("L") or "RGB". 16-bit and float images (PNG/TIFF modes I;16, I,
F: common in medical imaging) are mapped to 8 bits through their 0.5-99.5 percentile
range, like DICOM without a stored window, instead of being clipped to white.

DICOM: the modality LUT (rescale slope/intercept) and the stored window (centre/width)
are applied; without a stored window the 0.5-99.5 percentile range is used. Multi-frame
files give their middle frame; MONOCHROME1 is inverted so that dense tissue is bright.
"""
from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from infra.safe_files import MAX_IMAGE_BYTES, SourceError, checked
from infra.errors import UserError

MAX_PIXELS = 50_000_000  # refuse absurd images (decompression bombs) with a clear message
# The tower resizes the short side to 224 before its centre crop, so what the preprocessing allocates
# grows with the aspect ratio, not the file size (1 x 6000 pixels -> 224 x 1,344,000). No scan is this
# elongated; refusing it bounds every image's preprocessing to 224 x 224 x MAX_ASPECT pixels.
MAX_ASPECT = 20
MAX_DICOM_VALUES = 150_000_000  # all frames x samples of a DICOM (a 512 x 512 x 500-slice series fits)


class ImageReadError(UserError, ValueError):
    pass


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:] == b"DICM"
    except OSError:
        return False


def _looks_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


MAX_INFLATED_BYTES = 2 * MAX_DICOM_VALUES + 16_000_000  # 16-bit values and a generous header


def _check_inflated(raw: bytes, path: Path):
    """A deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99) is inflated whole by pydicom
    before even its header can be read, so a 1 MB file could take gigabytes before the pixel
    count is checked. Its inflated size is counted here first, in 1 MB pieces that are thrown
    away, and a file that would inflate past MAX_INFLATED_BYTES is refused."""
    if len(raw) < 144 or raw[128:132] != b"DICM" or b"1.2.840.10008.1.2.1.99" not in raw[132:1024]:
        return
    if raw[132:136] != b"\x02\x00\x00\x00":  # (0002,0000): the meta group's length, where the deflated part starts
        raise ImageReadError(f"{path}: deflated DICOM without a file meta group length; cannot check its size")
    start = 144 + int.from_bytes(raw[140:144], "little")
    inflate, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    pending = raw[start:]
    while pending:
        total += len(inflate.decompress(pending, 1 << 20))
        pending = inflate.unconsumed_tail
        if total > MAX_INFLATED_BYTES:
            raise ImageReadError(f"{path}: deflated DICOM inflates to more than {MAX_INFLATED_BYTES // 1_000_000} MB; "
                                 "downscale it first")
        if inflate.eof:
            break


def read_dicom(path: str | Path, data: bytes | None = None) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()  # below MAX_IMAGE_BYTES (load_image checked it)
        except OSError as exc:
            raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from exc
    try:
        _check_inflated(data, path)
    except zlib.error as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file (deflated data: {exc})") from None
    source = lambda: io.BytesIO(data)  # noqa: E731
    try:
        # the header alone first: the pixel count is checked before any pixel is decoded, so a
        # few-MB deflated file that inflates to gigabytes is refused without inflating it
        header = pydicom.dcmread(source(), stop_before_pixels=True)
        rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
        frames = int(header.get("NumberOfFrames", 1) or 1)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from exc
    if rows and cols:
        check_shape(cols, rows, str(path))  # the one shape rule (aspect ratio, megapixels), from the header alone
    if rows * cols > MAX_PIXELS or rows * cols * max(frames, 1) * max(samples, 1) > MAX_DICOM_VALUES:
        raise ImageReadError(f"{path}: DICOM image of {rows}x{cols} pixels x {frames} frame(s) x {samples} sample(s) "
                             f"is too large (more than {MAX_PIXELS // 1_000_000} megapixels per frame or "
                             f"{MAX_DICOM_VALUES // 1_000_000}M values); downscale it first")
    try:
        ds = pydicom.dcmread(source())
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from exc
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file has no pixel data (is it a report, plan or structure set?)")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # codecs raise their own types for truncated or unsupported data
        raise ImageReadError(f"{path}: cannot decode the DICOM pixel data ({exc})") from exc
    if arr.size > MAX_DICOM_VALUES:  # a header that understated the data
        raise ImageReadError(f"{path}: DICOM image of {arr.shape} values is too large")
    rgb = ds.get("SamplesPerPixel", 1) == 3
    if frames > 1:
        arr = arr[frames // 2]
    if rgb:
        return Image.fromarray(np.asarray(arr, dtype=np.uint8) if arr.dtype == np.uint8 else
                               _to_uint8(arr.astype(np.float32), None), mode="RGB")
    arr = apply_modality_lut(arr, ds).astype(np.float32)
    window = None
    if "VOILUTSequence" in ds:  # a non-linear lookup table: apply it, then use its full range
        arr = apply_voi_lut(arr, ds).astype(np.float32)
    elif "WindowCenter" in ds and "WindowWidth" in ds:  # linear window, in modality units (e.g. HU)
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        window = (center - width / 2, center + width / 2)
    img = _to_uint8(arr, window)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        img = 255 - img
    return Image.fromarray(img, mode="L")


def _to_uint8(arr: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    lo, hi = window if window else (np.percentile(arr, 0.5), np.percentile(arr, 99.5))
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max()) + 1e-6
    return (np.clip((arr - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def check_shape(width: int, height: int, name: str):
    """The one size rule for every image reader: not empty, at most MAX_PIXELS, at most
    MAX_ASPECT times longer than wide (or the reverse)."""
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise ImageReadError(f"{name}: an image of {width}x{height} pixels is empty or too large (more than "
                             f"{MAX_PIXELS // 1_000_000} megapixels); downscale it first")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageReadError(f"{name}: an image of {width}x{height} pixels is more than {MAX_ASPECT} times longer "
                             "than wide; crop it to the region of interest first")


def _to_8bit(im: Image.Image) -> Image.Image:
    """Grey 8-bit or RGB, whatever Pillow decoded (16-bit/float grey is windowed, palette
    and CMYK images are converted). Transparent pixels are composited on black (the background
    of a scan), not shown in the colour they hide."""
    if im.mode in ("L", "RGB"):
        return im
    if im.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info):
        grey = im.mode in ("LA", "La")
        rgba = im.convert("RGBA")
        on_black = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        return on_black.convert("L" if grey else "RGB")
    if im.mode.startswith("I") or im.mode == "F":  # I;16, I;16B, I;16L, I, F: high dynamic range grey
        arr = np.asarray(im, dtype=np.float32)
        finite = np.isfinite(arr)
        if not finite.all():
            arr = np.where(finite, arr, arr[finite].min() if finite.any() else 0)
        return Image.fromarray(_to_uint8(arr, None), mode="L")
    if im.mode in ("1", "LA", "La"):
        return im.convert("L")
    return im.convert("RGB")


def load_image(path: str | Path, data: bytes | None = None) -> Image.Image:
    """Any supported image as an "L" or "RGB" PIL image, from ``path`` or from ``data`` (then
    ``path`` only names it in messages). Errors say what is wrong with which file."""
    path = Path(path)
    if data is None:
        try:
            checked(path, MAX_IMAGE_BYTES, what="image")  # a regular file below the byte limit
        except FileNotFoundError:
            raise ImageReadError(f"{path}: file not found") from None
        except SourceError as exc:
            raise ImageReadError(str(exc)) from None
        if is_dicom(path):
            return read_dicom(path)
    elif _looks_dicom(data) or path.suffix.lower() in (".dcm", ".dicom"):
        return read_dicom(path, data)
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            check_shape(im.width, im.height, str(path))
            im.load()  # decodes everything: truncated files fail here
            # a phone photo of a screen stores its rotation in EXIF: left and right must stay where they are
            return _to_8bit(ImageOps.exif_transpose(im)).copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageReadError):
            raise
        raise ImageReadError(f"{path}: not a readable image (PNG, JPEG or DICOM expected; "
                             f"{exc.__class__.__name__}: {exc})") from exc


def as_image(obj, name: str = "image") -> Image.Image:
    """The one normalisation for images given in code (the Python API, the web demo): a path
    (PNG/JPEG/DICOM, through ``load_image``), a PIL image or a numpy array ([H, W] grey of any
    numeric type, [H, W, 3|4] uint8) become the same 8-bit "L"/"RGB" image a file would: 16-bit
    and float grey is windowed, palette and alpha converted, sizes checked."""
    if isinstance(obj, (str, Path)):
        return load_image(obj)
    if type(obj).__module__ == "numpy" and hasattr(obj, "ndim"):
        arr = np.asarray(obj)
        if arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
            obj = Image.fromarray(arr, mode="RGBA" if arr.shape[2] == 4 else "RGB")
        elif arr.ndim == 2 and (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            if arr.size and arr.size <= MAX_PIXELS:
                obj = Image.fromarray(arr.astype(np.uint8)) if arr.dtype == np.uint8 else \
                    Image.fromarray(arr.astype(np.float32), mode="F")
            else:
                raise ImageReadError(f"{name}: an array of {arr.shape} pixels is empty or too large")
        else:
            raise ImageReadError(f"{name}: a numpy image must be [H, W] grey or [H, W, 3] uint8 RGB, got "
                                 f"{arr.shape} {arr.dtype}")
    if not isinstance(obj, Image.Image):
        raise TypeError(f"{name} must be a file path, a PIL image or a numpy array, got {type(obj).__name__}")
    check_shape(obj.width, obj.height, name)
    return _to_8bit(ImageOps.exif_transpose(obj))
