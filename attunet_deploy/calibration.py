"""Read images and label masks (.npy/.npz, PNG/TIFF/JPEG, DICOM, NIfTI) and split a user's image
set into held-out golden images and calibration images.

Readers return raw intensities (DICOM with rescale slope/intercept applied, so HU for CT);
the bundle's normalisation is applied afterwards exactly as at run time
(:func:`attunet_deploy.preprocess.normalize`). Images of different sizes are fine.

Every reader checks sizes before decoding (see :mod:`attunet_deploy.limits`): a file that is
not a regular file, too large, or declares more pixels than the limit is refused with a
message naming the limit and how to raise it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import limits
from .errors import InputError
from .preprocess import check_batch, normalize, pad_to_divisor

ARRAY_EXT = (".npy", ".npz")
RASTER_EXT = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
DICOM_EXT = (".dcm", ".dicom", ".ima")
NIFTI_EXT = (".nii", ".nii.gz")
SUPPORTED = ", ".join(ARRAY_EXT + RASTER_EXT + DICOM_EXT + NIFTI_EXT)
LABEL_EXT = (".npy", ".npz", ".png", ".tif", ".tiff", ".bmp", ".nii", ".nii.gz")
#: Held-out golden images: a quarter of the files, at least 1 and at most 32 files ...
GOLDEN_FRACTION = 0.25
GOLDEN_MAX_FILES = 32
#: ... and at most this many 2D images in all (volumes contribute evenly spaced slices).
GOLDEN_MAX_IMAGES = 64
GOLDEN_MAX_PER_FILE = 16


@dataclass
class ImageRecord:
    """One 2D image of ``channels`` channels as raw float32 [C, H, W], with where it came from."""

    pixels: np.ndarray
    source: Path
    index: int = 0  # slice/frame/array index inside the source file
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. NIfTI affine, for writing masks back
    rel: str = ""  # path relative to the folder the user named (for reports and label matching)

    @property
    def label(self) -> str:
        base = self.rel or self.source.name
        return f"{base}[{self.index}]" if self.meta.get("multi") else base


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def stem_key(rel: str) -> str:
    """Relative path without its extension: ``a/b/slice_012.dcm`` -> ``a/b/slice_012`` (label matching)."""
    p = Path(rel)
    suffix = suffix_of(p)
    name = p.name[: -len(suffix)] if suffix and p.name.lower().endswith(suffix) else p.name
    return (p.parent / name).as_posix() if str(p.parent) != "." else name


def _is_dicom(path: Path) -> bool:
    if suffix_of(path) in DICOM_EXT:
        return True
    if path.suffix:  # DICOM files often have no extension; anything else with one is not DICOM
        return False
    try:
        if not path.is_file():
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.pread(fd, 4, 128) == b"DICM"
        finally:
            os.close(fd)
    except OSError:
        return False


def list_image_files(path: str | os.PathLike[str], exts: tuple[str, ...] | None = None) -> list[Path]:
    """Supported files at ``path`` (a file, or a directory searched recursively), sorted."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"image path not found: {p}")
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise InputError(f"{p} is not a regular file or folder (device, FIFO or socket)")
    allowed = exts or (ARRAY_EXT + RASTER_EXT + NIFTI_EXT)
    files = [f for f in sorted(p.rglob("*")) if f.is_file() and not any(part.startswith(".") for part in
                                                                           f.relative_to(p).parts)
             and (suffix_of(f) in allowed or (exts is None and _is_dicom(f)))]
    if not files:
        what = "label masks" if exts else "images"
        raise InputError(f"no {what} in {p} (supported: {', '.join(exts) if exts else SUPPORTED}"
                         f"{'' if exts else ', or DICOM without extension'})")
    return files


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to the folder the user named (its own name when ``root`` is the file)."""
    if root.is_file() or root == path:
        return path.name
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _to_chw_list(arr: np.ndarray, channels: int, source: Path) -> list[np.ndarray]:
    """Split an array into [C, H, W] images: accepts [N,C,H,W], [C,H,W], [N,H,W] (C=1), [H,W]."""
    arr = np.asarray(arr)
    _check_numeric(arr.dtype, source)
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape[0] == channels else arr[:, None] if channels == 1 else None
        if arr is None:
            raise InputError(f"{source}: a 3D array must be [C={channels}, H, W]")
    if arr.ndim != 4 or arr.shape[1] != channels:
        raise InputError(f"{source}: array of shape {np.shape(arr)} is not [N, {channels}, H, W], "
                         f"[{channels}, H, W] or [H, W]")
    return [a.astype(np.float32) for a in arr]


def _check_numeric(dtype: np.dtype, source: object) -> None:
    if dtype.kind == "c":
        raise InputError(f"{source}: complex-valued data ({dtype}); save the magnitude or real part instead")
    if dtype.kind not in "biuf":
        raise InputError(f"{source}: array dtype {dtype} is not numeric")


def _check_array_shape(shape: tuple[int, ...], dtype: np.dtype, source: object) -> None:
    _check_numeric(dtype, source)
    if len(shape) < 2 or len(shape) > 4:
        raise InputError(f"{source}: array of shape {shape} is not an image or a stack of images")
    limits.check_pixels(int(shape[-2]), int(shape[-1]), source)
    total = int(np.prod(shape, dtype=np.float64)) * 4
    if total > limits.IMAGE_FILE.bytes():
        raise limits.too_large(source, total, limits.IMAGE_FILE)


def _npy_header(fh: Any, source: object) -> tuple[tuple[int, ...], np.dtype]:
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = npformat.read_array_header_1_0(fh)
        else:
            shape, _, dtype = npformat.read_array_header_2_0(fh)
    except (ValueError, OSError) as exc:
        raise InputError(f"{source}: not a valid .npy array ({str(exc)[:100]})") from None
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _load_npy(path: Path) -> np.ndarray:
    size = limits.check_regular_file(path, "image")
    if size > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, size, limits.IMAGE_FILE)
    with open(path, "rb") as fh:
        shape, dtype = _npy_header(fh, path)
    _check_array_shape(shape, dtype, path)
    return np.load(path, allow_pickle=False)


def _load_npz(path: Path) -> np.ndarray:
    size = limits.check_regular_file(path, "image")
    if size > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, size, limits.IMAGE_FILE)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a valid .npz archive ({str(exc)[:100]})") from None
    with zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
        if not members:
            raise InputError(f"{path}: empty .npz")
        names = [m.filename[:-4] for m in members]
        info = members[names.index("images")] if "images" in names else members[0]
        if info.file_size > limits.IMAGE_FILE.bytes():
            raise limits.too_large(f"{path}:{info.filename}", info.file_size, limits.IMAGE_FILE)
        with zf.open(info) as fh:
            shape, dtype = _npy_header(fh, path)
        _check_array_shape(shape, dtype, path)
        with zf.open(info) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)


def _match_channels(img: np.ndarray, channels: int, source: Path) -> np.ndarray:
    """[H, W] or [H, W, C] raster -> [C, H, W] with the model's channel count."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:  # drop alpha
        img = img[:, :, :3]
    have = img.shape[2]
    if have == channels:
        out = img
    elif channels == 1 and have == 3:
        out = (img @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
    elif have == 1:
        out = np.repeat(img, channels, axis=2)
    else:
        raise InputError(f"{source}: image has {have} channels, the model takes {channels}")
    return np.ascontiguousarray(np.transpose(out, (2, 0, 1)), dtype=np.float32)


@contextlib.contextmanager
def _reading(path: Path, what: str = "") -> Iterator[None]:
    """Turn whatever a reader library raises into one InputError naming the file; library
    warnings are not the user's business, errors are."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except InputError:
        raise
    except ImportError as exc:
        raise InputError(f"{what}{path}: reading it needs {exc.name}: pip install 'attunet-deploy[medical]'") from exc
    except MemoryError:
        raise InputError(f"{what}{path}: not enough memory to read it; lower its size or "
                         f"{limits.IMAGE_FILE.env}") from None
    except Exception as exc:
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {what}{path}: {text}") from exc


def read_file(path: Path, channels: int, rel: str = "") -> list[ImageRecord]:
    """All 2D images in one file, as raw intensities; each record's ``meta["count"]`` is how many
    images the file holds (a label must have as many slices)."""
    records = _read_file(path, channels, rel)
    for r in records:
        r.meta["count"] = len(records)
    return records


def _read_file(path: Path, channels: int, rel: str = "") -> list[ImageRecord]:
    suffix = suffix_of(path)
    rel = rel or path.name
    with _reading(path):
        if suffix == ".npy":
            return [ImageRecord(a, path, i, {"multi": True}, rel) for i, a in
                    enumerate(_to_chw_list(_load_npy(path), channels, path))]
        if suffix == ".npz":
            arrays = _to_chw_list(_load_npz(path), channels, path)
            return [ImageRecord(a, path, i, {"multi": True}, rel) for i, a in enumerate(arrays)]
        if suffix in RASTER_EXT:
            return [_read_raster(path, channels, rel)]
        if suffix in NIFTI_EXT:
            return _read_nifti(path, channels, rel)
        if _is_dicom(path):
            return _read_dicom(path, channels, rel)
    raise InputError(f"{path}: unsupported file type (supported: {SUPPORTED})")


def _open_raster(path: Path) -> Any:
    from PIL import Image

    size = limits.check_regular_file(path, "image")
    if size > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, size, limits.IMAGE_FILE)
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a message that says how to raise it
    try:
        im = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    limits.check_pixels(h, w, path)
    return im


def _read_raster(path: Path, channels: int, rel: str) -> ImageRecord:
    with _open_raster(path) as im:
        if im.mode in ("P", "LA", "PA", "1"):
            im = im.convert("RGBA" if "A" in im.mode else "L")
        arr = np.asarray(im, dtype=np.float32)
    return ImageRecord(_match_channels(arr, channels, path), path, 0, {}, rel)


def dicom_header(path: Path) -> Any:
    """A DICOM dataset without pixel data, after size checks (raises InputError)."""
    import pydicom

    size = limits.check_regular_file(path, "DICOM file")
    if size > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, size, limits.IMAGE_FILE)
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:
        raise InputError(f"{path}: not a readable DICOM file ({str(exc)[:120]})") from None


def _read_dicom(path: Path, channels: int, rel: str) -> list[ImageRecord]:
    import pydicom

    head = dicom_header(path)
    rows, cols = int(getattr(head, "Rows", 0) or 0), int(getattr(head, "Columns", 0) or 0)
    frames_n = int(getattr(head, "NumberOfFrames", 1) or 1)
    limits.check_pixels(rows, cols, path)
    if rows * cols * frames_n * 4 > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, rows * cols * frames_n * 4, limits.IMAGE_FILE)
    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(f"{path}: DICOM file has no pixel data")
    pixels = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    pixels = pixels * slope + intercept
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frames = pixels if (pixels.ndim == 3 and samples == 1) or pixels.ndim == 4 else pixels[None]
    meta = {"multi": len(frames) > 1, "rescale": [slope, intercept]}
    return [ImageRecord(_match_channels(f, channels, path), path, i, meta, rel) for i, f in enumerate(frames)]


def _nifti(path: Path) -> Any:
    import nibabel as nib

    size = limits.check_regular_file(path, "NIfTI file")
    if size > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, size, limits.IMAGE_FILE)
    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.header.get_data_shape())
    _check_numeric(np.dtype(img.header.get_data_dtype()), path)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) not in (2, 3):
        raise InputError(f"{path}: NIfTI with {len(shape)} dimensions; 2D images or 3D volumes only")
    limits.check_pixels(shape[0], shape[1], path)
    total = int(np.prod(shape, dtype=np.float64)) * 4
    if total > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, total, limits.IMAGE_FILE)
    return img


def _nifti_data(img: Any) -> np.ndarray:
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    return data


def _read_nifti(path: Path, channels: int, rel: str) -> list[ImageRecord]:
    img = _nifti(path)
    data = _nifti_data(img)
    meta = {"multi": data.shape[2] > 1, "affine": np.asarray(img.affine), "nifti_shape": data.shape}
    return [ImageRecord(_match_channels(data[:, :, k], channels, path), path, k, meta, rel)
            for k in range(data.shape[2])]


def iter_images(path: str | os.PathLike[str], channels: int) -> Iterator[ImageRecord]:
    root = Path(path)
    for f in list_image_files(root):
        yield from read_file(f, channels, relative_name(f, root))


def load_images(path: str | os.PathLike[str], channels: int, max_samples: int | None = None) -> list[ImageRecord]:
    """Every image at ``path``; with ``max_samples``, an evenly spaced deterministic subset."""
    if max_samples is not None and max_samples < 1:
        raise InputError("--max-samples must be >= 1")
    root = Path(path)
    files = list_image_files(root)
    per_file = None
    if max_samples is not None:
        files, per_file = sample_files(files, max_samples)
    records: list[ImageRecord] = []
    for f in files:
        records += subsample(read_file(f, channels, relative_name(f, root)), per_file)
        check_held(records)
    if not records:
        raise InputError(f"no images found in {path}")
    return subsample(records, max_samples)


def sample_files(files: list[Path], max_images: int) -> tuple[list[Path], int]:
    """(files to read, images to keep of each): a folder is sampled by file *before* any pixel is
    decoded, so a command holds about ``max_images`` images however many files the folder has."""
    if len(files) > max_images:
        idx = np.unique(np.linspace(0, len(files) - 1, max_images).round().astype(int))
        files = [files[i] for i in idx]
    return files, max(1, math.ceil(max_images / max(1, len(files))))


def check_held(records: list[ImageRecord]) -> None:
    """The memory budget of decoded images one command holds at once (a named, raisable limit)."""
    held = sum(r.pixels.nbytes for r in records)
    if held > limits.HELD_IMAGES.bytes():
        raise InputError(f"the images kept for this command take {held / 2**20:,.0f} MB decoded, above the "
                         f"{limits.HELD_IMAGES.what} limit of {limits.HELD_IMAGES.describe()}: use fewer or smaller "
                         f"images, or set {limits.HELD_IMAGES.env} to raise it")


def subsample(records: list[ImageRecord], max_samples: int | None) -> list[ImageRecord]:
    if max_samples is not None and len(records) > max_samples:
        idx = np.unique(np.linspace(0, len(records) - 1, max_samples).round().astype(int))
        records = [records[i] for i in idx]
    return records


def model_inputs(records: list[ImageRecord], preprocessing: dict[str, Any], divisor: int) -> list[np.ndarray]:
    """Raw records -> normalised, padded float32 [1, C, H, W] arrays, one per image."""
    out = []
    for rec in records:
        x = check_batch(rec.pixels[None], rec.pixels.shape[0], name=rec.label)
        x = normalize(x, preprocessing)
        out.append(pad_to_divisor(x, divisor)[0])
    return out


def file_sha256(path: Path) -> str:
    limits.check_regular_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ===================================================================================== golden split
def split_holdout(files: list[Path], root: Path) -> tuple[list[Path], list[Path]]:
    """(golden, calibration) files: a deterministic quarter (1..32 files) held out for verification.

    A file's rank is the sha256 of its path relative to ``root`` (so the split does not depend
    on where the folder lives or on file order); the lowest-ranked quarter is held out.
    """
    if not files:
        raise InputError(f"no images in {root}")
    ranked = sorted(files, key=lambda f: hashlib.sha256(relative_name(f, root).encode()).hexdigest())
    k = min(GOLDEN_MAX_FILES, max(1, round(len(files) * GOLDEN_FRACTION)))
    held = set(ranked[:k])
    return [f for f in files if f in held], [f for f in files if f not in held]


def split_images(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(golden, calibration) images of a single multi-image file (a volume or a stack): a
    deterministic quarter of its images, ranked by the sha256 of ``path[index]``."""
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"{r.rel}[{r.index}]".encode()).hexdigest())
    k = min(GOLDEN_MAX_IMAGES, max(1, round(len(records) * GOLDEN_FRACTION)))
    held = {id(r) for r in ranked[:k]}
    return [r for r in records if id(r) in held], [r for r in records if id(r) not in held]


def golden_records(files: list[Path], root: Path, channels: int) -> list[ImageRecord]:
    """The held-out images, at most GOLDEN_MAX_PER_FILE slices of a volume and GOLDEN_MAX_IMAGES in all."""
    out: list[ImageRecord] = []
    for f in files:
        recs = read_file(f, channels, relative_name(f, root))
        out += subsample(recs, GOLDEN_MAX_PER_FILE)
    return subsample(out, GOLDEN_MAX_IMAGES)


# ===================================================================================== labels
def label_index(labels: str | os.PathLike[str]) -> dict[str, Path]:
    """Label files under ``labels`` keyed by relative path without extension."""
    root = Path(labels)
    files = list_image_files(root, exts=LABEL_EXT)
    index: dict[str, Path] = {}
    for f in files:
        key = stem_key(relative_name(f, root))
        if key in index:
            raise InputError(f"two label files for the same image: {index[key]} and {f}")
        index[key] = f
    return index


def match_labels(image_files: list[Path], image_root: Path, labels: str | os.PathLike[str]) -> dict[Path, Path]:
    """image file -> label file by relative path without extension; InputError naming the first
    image without a label or label without an image."""
    index = label_index(labels)
    keys: dict[str, Path] = {}
    for f in image_files:
        key = stem_key(relative_name(f, image_root))
        if key in keys:
            raise InputError(f"images {keys[key]} and {f} differ only by extension, so one label {key}.* cannot "
                             "belong to both: rename one of them")
        keys[key] = f
    for key, f in keys.items():
        if key not in index:
            raise InputError(f"no label for image {f}: expected {key}.png (or .npy/.tif/.nii.gz) under {labels}")
    for key, lf in index.items():
        if key not in keys:
            raise InputError(f"label {lf} has no image: expected an image named {key}.* under {image_root}")
    return {f: index[key] for key, f in keys.items()}


def _array_hw(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    """(H, W) of an array laid out [H, W], [N, H, W] or [N, C, H, W]."""
    if len(shape) < 2 or len(shape) > 4:
        raise InputError(f"{path} has shape {list(shape)}: expected [H, W], [N, H, W] or [N, C, H, W]")
    if len(shape) == 3 and shape[2] in (1, 3, 4) and shape[0] > 4 and shape[1] > 4:
        raise InputError(f"{path} has shape {list(shape)}, which looks channels-last: save it as [H, W] or "
                         "[N, H, W]")
    return int(shape[-2]), int(shape[-1])


def header_hw(path: Path) -> tuple[int, int]:
    """(H, W) of an image or label file from its header alone (no pixel data decoded)."""
    suffix = suffix_of(path)
    with _reading(path):
        if suffix == ".npy":
            limits.check_regular_file(path)
            with open(path, "rb") as fh:
                shape, _ = _npy_header(fh, path)
            return _array_hw(shape, path)
        if suffix == ".npz":
            limits.check_regular_file(path)
            with zipfile.ZipFile(path) as zf:
                members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
                if not members:
                    raise InputError(f"{path}: empty .npz")
                names = [m.filename[:-4] for m in members]
                with zf.open(members[names.index("images")] if "images" in names else members[0]) as fh:
                    shape, _ = _npy_header(fh, path)
            return _array_hw(shape, path)
        if suffix in RASTER_EXT:
            with _open_raster(path) as im:
                return im.size[1], im.size[0]
        if suffix in NIFTI_EXT:
            shape = _nifti(path).header.get_data_shape()
            return int(shape[0]), int(shape[1])
        head = dicom_header(path)
        return int(getattr(head, "Rows", 0) or 0), int(getattr(head, "Columns", 0) or 0)


def check_label_shapes(pairs: dict[Path, Path]) -> None:
    """Every image and its label have the same H and W (headers only); InputError naming the pair."""
    for image, label in pairs.items():
        hi, wi = header_hw(image)
        hl, wl = header_hw(label)
        if (hi, wi) != (hl, wl):
            raise InputError(f"label {label} is {hl}x{wl}, image {image} is {hi}x{wi}: shapes must match")


def read_label_file(path: Path, num_classes: int) -> list[np.ndarray]:
    """Label masks in ``path`` as uint8 [H, W] per slice: binary (> 0) for one output channel (or
    two with argmax), class indices 0..K-1 otherwise."""
    suffix = suffix_of(path)
    with _reading(path, "label "):
        if suffix == ".npy":
            arr = _load_npy(path)
        elif suffix == ".npz":
            arr = _load_npz(path)
        elif suffix in RASTER_EXT:
            with _open_raster(path) as im:
                if im.mode == "P":
                    arr = np.asarray(im)  # palette index = class
                else:
                    arr = np.asarray(im.convert("I") if im.mode in ("I;16", "I;16B", "I") else im)
            if arr.ndim == 3:
                if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, min(arr.shape[2], 3))):
                    raise InputError(f"label {path} is a colour image: save masks as greyscale class indices")
                arr = arr[..., 0]
        elif suffix in NIFTI_EXT:
            arr = np.moveaxis(_nifti_data(_nifti(path)), 2, 0)
        else:
            raise InputError(f"label {path}: unsupported type (use {', '.join(LABEL_EXT)})")
    arr = np.asarray(arr)
    _check_numeric(arr.dtype, path)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(f"label {path} has shape {arr.shape}: expected [H, W] or [N, H, W]")
    if not np.isfinite(arr).all():
        raise InputError(f"label {path} contains NaN/Inf")
    if num_classes <= 2:
        values = np.unique(arr)
        if values.size > 2:
            shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
            raise InputError(f"label {path} holds {values.size} values ({shown}) but the model has one foreground "
                             "class: save a two-valued mask (0 and the class), e.g. (label == K) for class K")
        return [(a > 0).astype(np.uint8) for a in arr]
    if np.any(arr < 0) or np.any(arr >= num_classes) or np.any(arr != np.round(arr)):
        raise InputError(f"label {path} holds values outside the class indices 0..{num_classes - 1}")
    return [a.astype(np.uint8) for a in arr]


def attach_labels(records: list[ImageRecord], label_files: dict[Path, Path], num_classes: int) -> list[np.ndarray]:
    """Label mask for each record (same order), checking slice counts and shapes."""
    cache: dict[Path, list[np.ndarray]] = {}
    out = []
    for rec in records:
        lf = label_files[rec.source]
        if lf not in cache:
            cache[lf] = read_label_file(lf, num_classes)
        masks = cache[lf]
        count = int(rec.meta.get("count", len(masks)))
        if len(masks) != count:
            raise InputError(f"label {lf} has {len(masks)} slice(s), image {rec.source} has {count}: one label "
                             "slice per image slice")
        m = masks[rec.index]
        if m.shape != rec.pixels.shape[1:]:
            raise InputError(f"label {lf} is {m.shape[0]}x{m.shape[1]}, image {rec.source} is "
                             f"{rec.pixels.shape[1]}x{rec.pixels.shape[2]}: shapes must match")
        out.append(m)
    return out
