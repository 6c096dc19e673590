"""Phantom generator and image readers (npy/npz, PNG, DICOM, NIfTI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attunet_deploy.bundle.spec import InputSpec, ModelSpec, Normalization
from attunet_deploy.demo.phantom import make_phantom, make_phantoms, window
from attunet_deploy.errors import InputError
from attunet_deploy.io.files import list_image_files
from attunet_deploy.io.images import load_images, model_inputs, read_file
from attunet_deploy.segmenter import Segmenter


def test_phantom_is_deterministic_and_labelled() -> None:
    a_img, a_lab = make_phantom(123)
    b_img, b_lab = make_phantom(123)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, make_phantom(124)[0])
    imgs, labels = make_phantoms(40, seed=5, size=(100, 120))
    assert imgs.shape == (40, 1, 100, 120) and labels.shape == (40, 100, 120)
    assert (labels.sum(axis=(1, 2)) > 20).all()  # every slice has a target
    assert imgs.min() < -900 and imgs.max() > 300  # air and bone in HU


def test_target_is_low_contrast() -> None:
    img, label = make_phantom(7)
    lab = label.astype(bool)
    target = img[lab].mean()
    ring = img[(np.roll(lab, 6, 0) | np.roll(lab, -6, 0) | np.roll(lab, 6, 1)) & ~lab]
    soft = ring[(ring > -300) & (ring < 300)]
    assert 20 < target - soft.mean() < 120  # HU above its surroundings, well inside a soft-tissue window


def test_window() -> None:
    assert window(np.array([-160.0, 40.0, 240.0])).tolist() == [0.0, 0.5, 1.0]


def test_npy_npz_layouts(tmp_path: Path) -> None:
    np.save(tmp_path / "nchw.npy", np.zeros((3, 1, 20, 30), np.float32))
    np.save(tmp_path / "hw.npy", np.zeros((20, 30), np.int16))
    np.save(tmp_path / "nhw.npy", np.zeros((2, 20, 30), np.float64))
    np.savez(tmp_path / "imgs.npz", images=np.zeros((4, 1, 8, 8), np.float32))
    recs = load_images(tmp_path, channels=1)
    assert len(recs) == 3 + 1 + 2 + 4
    assert all(r.pixels.ndim == 3 and r.pixels.shape[0] == 1 and r.pixels.dtype == np.float32 for r in recs)
    with pytest.raises(InputError, match="must be"):
        read_file(tmp_path / "nhw.npy", channels=3)


def test_max_samples_is_deterministic(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((10, 1, 4, 4)))
    a = [r.pixels[0, 0, 0] for r in load_images(tmp_path, 1, max_samples=4)]
    b = [r.pixels[0, 0, 0] for r in load_images(tmp_path, 1, max_samples=4)]
    assert a == b == [0.0, 3.0, 6.0, 9.0]


def test_png_folder_and_channel_matching(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((30, 40), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((25, 35, 3), np.uint8) + np.array([255, 0, 0], np.uint8)).save(tmp_path / "sub" / "b.png")
    (tmp_path / "notes.txt").write_text("ignored")
    grey = load_images(tmp_path, channels=1)
    assert [r.pixels.shape for r in grey] == [(1, 30, 40), (1, 25, 35)]
    assert grey[1].pixels.max() == pytest.approx(0.299 * 255, rel=1e-3)
    rgb = load_images(tmp_path, channels=3)
    assert rgb[0].pixels.shape == (3, 30, 40)


def test_dicom_rescale_applied() -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("CT_small.dcm"))
    (rec,) = read_file(path, channels=1)
    ds = pydicom.dcmread(str(path))
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(rec.pixels[0], expected)
    assert rec.pixels.min() < 0  # Hounsfield units, not raw stored values


def test_nifti_volume_slices(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(0).standard_normal((24, 20, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 2.5, 1.0])), str(tmp_path / "ct.nii.gz"))
    recs = read_file(tmp_path / "ct.nii.gz", channels=1)
    assert len(recs) == 3 and recs[2].index == 2
    assert np.allclose(recs[1].pixels[0], vol[:, :, 1])
    assert np.allclose(recs[0].meta["affine"], np.diag([0.7, 0.7, 2.5, 1.0]))


def test_model_inputs_normalise_and_pad(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.full((1, 1, 20, 30), 40.0, np.float32))
    segmenter = Segmenter(ModelSpec(InputSpec(1, 1), Normalization.parse("ct-window:40,400")))
    (x,) = model_inputs(load_images(tmp_path, 1), segmenter)
    assert x.shape == (1, 1, 32, 32) and np.allclose(x, 0.5)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        list_image_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images in"):
        load_images(tmp_path / "empty", 1)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read"):
        read_file(tmp_path / "bad.png", 1)
    with pytest.raises(InputError, match="max-samples"):
        np.save(tmp_path / "ok.npy", np.zeros((2, 2)))
        load_images(tmp_path / "ok.npy", 1, max_samples=0)


def test_phantom_volumes_are_deterministic_and_labelled() -> None:
    from attunet_deploy.demo.phantom3d import DEMO3D_SIZE, make_volume, make_volumes

    a, la = make_volume(7)
    b, lb = make_volume(7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape == la.shape == DEMO3D_SIZE and a.dtype == np.float32
    x, y = make_volumes(4, seed=2)
    assert x.shape == (4, 1, *DEMO3D_SIZE) and all(v.sum() > 50 for v in y)  # the target is in every volume
    inside = x[:, 0][y.astype(bool)]
    assert 60 < float(np.median(inside)) < 150  # the target's contrast (about 105 HU) survives the blur


def test_input_folders_on_virtual_filesystems_are_refused_not_crawled(tmp_path: Path) -> None:
    """/proc holds unreadable entries (/proc/1/cwd): a walk of it was a PermissionError traceback."""
    from attunet_deploy.io.dicom import dicom_files
    from attunet_deploy.io.files import walk_files
    from attunet_deploy.io.volumes import list_volumes

    for walk in (list_image_files, list_volumes, lambda p: dicom_files([p])):
        for path in ("/proc", "/proc/self", "/sys/kernel"):
            with pytest.raises(InputError, match="virtual filesystem"):
                walk(path)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "a.npy").write_bytes(b"x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c.npy").write_bytes(b"x")
    (tmp_path / ".d.npy").write_bytes(b"x")
    assert walk_files(tmp_path) == [tmp_path / "b" / "c.npy"]


def test_resampling_that_would_blow_a_volume_up_is_refused() -> None:
    from attunet_deploy.preprocess import resample_linear

    with pytest.raises(InputError, match="above the"):
        resample_linear(np.zeros((1, 2, 2, 2), np.float32), (4000, 4000, 4000))
