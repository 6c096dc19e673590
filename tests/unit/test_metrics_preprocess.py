"""Agreement metrics, tolerance gates, padding/cropping and normalisation (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from attunet_deploy.bundle.spec import InputSpec, ModelSpec, Normalization, Postprocessing
from attunet_deploy.errors import InputError
from attunet_deploy.judge.results import Agreement
from attunet_deploy.judge.verify import DEFAULT_TOLERANCES, GoldenCase, Tolerance, compare, judge
from attunet_deploy.metrics import abs_errors, confident_flips, dice, iou, per_image_overlap, rel_l2
from attunet_deploy.preprocess import crop, logits_to_masks, normalize, pad_to_divisor, padded_size
from attunet_deploy.segmenter import Segmenter

SEGMENTER = Segmenter(ModelSpec(InputSpec(1, 1)))


def test_rel_l2_and_abs_errors_by_hand() -> None:
    ref = np.array([3.0, 4.0])  # norm 5
    out = np.array([3.0, 5.0])  # diff norm 1
    assert rel_l2(out, ref) == pytest.approx(0.2)
    assert abs_errors(out, ref) == (1.0, 0.5)
    assert rel_l2(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_l2(np.ones(3), np.zeros(3)) == float("inf")


def test_dice_and_iou_by_hand() -> None:
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 1, 0]], bool)
    assert dice(a, b) == pytest.approx(2 * 1 / 4)  # |A∩B|=1, |A|+|B|=4
    assert iou(a, b) == pytest.approx(1 / 3)
    empty = np.zeros((2, 2), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, np.ones((2, 2), bool)) == 0.0


def test_multiclass_overlap_averages_foreground_classes() -> None:
    m = np.array([[[0, 1, 2, 2]]])
    r = np.array([[[0, 1, 2, 1]]])
    d, j = per_image_overlap(m, r, 3)
    # class 1: A={1}, B={1,3} -> 2/3; class 2: A={2,3}, B={2} -> 2/3
    assert d == [pytest.approx(2 / 3)]
    assert j == [pytest.approx(0.5)]


def test_confident_flips() -> None:
    ref_logits = np.array([[[[5.0, -0.5, 0.1, -3.0]]]])
    ref = (ref_logits[:, 0] > 0).astype(np.uint8)
    out = 1 - ref  # everything flipped
    assert confident_flips(out, ref, ref_logits) == 2  # |5| and |-3| are > 2
    two = np.array([[[[4.0, 0.0]], [[0.0, 1.0]]]])  # margins 4 and 1
    ref2 = np.argmax(two, axis=1)
    assert confident_flips(1 - ref2, ref2, two) == 1


def _case(seed: int = 0) -> GoldenCase:
    rng = np.random.default_rng(seed)
    return GoldenCase(rng.standard_normal((2, 1, 16, 16)).astype(np.float32) * 0,
                      rng.standard_normal((2, 1, 16, 16)).astype(np.float32) * 3)


def test_compare_exact_passes_and_perturbed_fails() -> None:
    case = _case()
    row = compare([case.logits.copy()], [case], SEGMENTER, DEFAULT_TOLERANCES["fp32"])
    a = row.agreement
    assert a is not None and row.status == "pass" and a.rel_l2 == 0.0 and a.mean_dice == 1.0
    assert a.flipped_pixels == 0 and a.pixel_agreement == 1.0
    noisy = case.logits + np.random.default_rng(1).standard_normal(case.logits.shape).astype(np.float32) * 0.5
    bad = compare([noisy], [case], SEGMENTER, DEFAULT_TOLERANCES["fp32"])
    assert bad.status == "fail" and bad.agreement is not None
    assert "rel_l2" in bad.reason and "pixel agreement" in bad.reason
    assert bad.agreement.flipped_pixels > 0 and bad.agreement.confident_flips <= bad.agreement.flipped_pixels
    assert bad.to_dict()["flipped_pixels"] == bad.agreement.flipped_pixels  # the JSON edge, key for key


def _agreement(**figures: float) -> Agreement:
    base = {"rel_l2": 0.0, "max_abs": 0.0, "mean_abs": 0.0, "pixel_agreement": 1.0, "mean_dice": 1.0,
            "worst_dice": 1.0, "mean_iou": 1.0}
    return Agreement(**{**base, **figures}, flipped_pixels=0, confident_flips=0, images=1, worst_images=())


def test_tolerance_gates_each_criterion() -> None:
    row = _agreement(rel_l2=2e-2, pixel_agreement=0.99, mean_dice=0.97, worst_dice=0.9)
    assert len(judge(row, DEFAULT_TOLERANCES["fp16"])) == 3  # rel_l2, mean, worst
    assert len(judge(row, DEFAULT_TOLERANCES["int8"])) == 2  # rel_l2 only reported for int8
    assert judge(row, Tolerance()) == []
    assert judge(_agreement(rel_l2=float("nan")), Tolerance(rel_l2=1.0))  # NaN never passes


def test_gt_dice_reported_when_labels_present() -> None:
    case = _case()
    case.labels = (case.logits[:, 0] > 0).astype(np.uint8)
    row = compare([case.logits], [case], SEGMENTER, Tolerance())
    assert row.metric("gt_dice") == 1.0


@pytest.mark.parametrize(("h", "w"), [(250, 300), (16, 16), (1, 7), (17, 1), (3, 3)])
def test_pad_and_crop_roundtrip(h: int, w: int) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, h, w)).astype(np.float32)
    xp, size = pad_to_divisor(x, 16)
    assert xp.shape[2:] == padded_size(h, w, 16) and xp.shape[2] % 16 == 0 and xp.shape[3] % 16 == 0
    assert np.array_equal(xp[:, :, :h, :w], x)
    assert np.array_equal(crop(xp, size), x)


def test_pad_reflects_instead_of_zero() -> None:
    x = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 1, 4) + np.zeros((1, 1, 2, 1), np.float32)
    xp, _ = pad_to_divisor(x, 8)
    assert xp[0, 0, 0].tolist() == [1, 2, 3, 4, 3, 2, 1, 2]


def test_normalisation_specs() -> None:
    ct = Normalization.parse("ct-window:40,400")
    x = np.array([[[[-160.0, 40.0, 240.0, 1000.0]]]], np.float32)
    assert normalize(x, ct).ravel().tolist() == [0.0, 0.5, 1.0, 1.0]
    ms = Normalization.parse("mean-std:1/2,2/4")
    y = normalize(np.ones((1, 2, 1, 1), np.float32) * 5, ms)
    assert y.ravel().tolist() == [2.0, 0.75]
    assert normalize(x, Normalization.parse("scale:2")).ravel()[1] == 20.0
    mm = normalize(x, Normalization.parse("minmax")).ravel()
    assert mm.min() == 0.0 and mm.max() == 1.0
    assert normalize(x, Normalization.parse(None)) is not None
    for bad in ("ct-window:40", "mean-std:1,0", "scale:0", "foo", "minmax:3"):
        with pytest.raises(InputError, match="bad normalisation"):
            Normalization.parse(bad)
    for spec in ("ct-window:40,400", "mean-std:1/2,2/4", "scale:2", "minmax", "none"):  # the manifest round trip
        n = Normalization.parse(spec)
        assert Normalization.from_dict(n.to_dict()) == n


def test_masks_from_logits() -> None:
    logits = np.array([[[[-1.0, 0.5]]]], np.float32)
    assert logits_to_masks(logits, Postprocessing("sigmoid_threshold", 0.5)).tolist() == [[[0, 1]]]
    # sigmoid(0.5) = 0.62: below a 0.7 threshold
    assert logits_to_masks(logits, Postprocessing("sigmoid_threshold", 0.7)).tolist() == [[[0, 0]]]
    two = np.array([[[[1.0, 0.0]], [[0.0, 2.0]]]], np.float32)
    assert logits_to_masks(two, Postprocessing("argmax")).tolist() == [[[0, 1]]]
    with pytest.raises(InputError, match="threshold"):
        Postprocessing("sigmoid_threshold", 1.5)


def test_streamed_errors_equal_the_concatenated_ones() -> None:
    from attunet_deploy.metrics import abs_errors, rel_l2, streamed_errors

    rng = np.random.default_rng(5)
    pairs = [(rng.normal(size=(2, 1, 7, 9)).astype(np.float32), rng.normal(size=(2, 1, 7, 9)).astype(np.float32))
             for _ in range(5)]
    out = np.concatenate([o.ravel() for o, _ in pairs])
    ref = np.concatenate([r.ravel() for _, r in pairs])
    rel, mx, mean = streamed_errors(pairs)
    assert rel == pytest.approx(rel_l2(out, ref), rel=1e-12)
    assert (mx, mean) == pytest.approx(abs_errors(out, ref), rel=1e-12)
    assert streamed_errors([(np.zeros(3), np.zeros(3))])[0] == 0.0
    assert streamed_errors([(np.ones(3), np.zeros(3))])[0] == float("inf")


def test_padding_and_cropping_per_axis() -> None:
    x = np.arange(2 * 1 * 5 * 17 * 33, dtype=np.float32).reshape(2, 1, 5, 17, 33)
    xp, size = pad_to_divisor(x, (1, 16, 16))
    assert xp.shape == (2, 1, 5, 32, 48) and size == (5, 17, 33)
    np.testing.assert_array_equal(crop(xp, size), x)
    two_d, size2 = pad_to_divisor(x[:, :, 0], 16)  # an int: H and W, as 2D bundles have always used
    assert two_d.shape == (2, 1, 32, 48) and size2 == (17, 33)


def test_resampling_keeps_extent_values_and_labels() -> None:
    from attunet_deploy.preprocess import resample_linear, resample_nearest, resampled_shape

    assert resampled_shape((24, 40, 36), (1.0, 0.8, 0.8), (2.0, 1.0, 1.0)) == (12, 32, 29)
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 4, 4))
    up = resample_linear(ramp, (16, 4, 4))
    assert up.shape == (16, 4, 4) and up.min() >= 0 and up.max() <= 7
    assert np.all(np.diff(up[:, 0, 0]) >= 0)  # monotone in, monotone out
    np.testing.assert_allclose(resample_linear(up, (8, 4, 4)), ramp, atol=0.26)
    labels = np.random.default_rng(0).integers(0, 3, (6, 10, 10)).astype(np.uint8)
    back = resample_nearest(resample_nearest(labels, (12, 20, 20)), (6, 10, 10))
    np.testing.assert_array_equal(back, labels)  # integer zoom: nearest there and back is exact
    assert set(np.unique(resample_nearest(labels, (5, 7, 9)))) <= {0, 1, 2}
