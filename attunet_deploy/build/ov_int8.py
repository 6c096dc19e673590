"""An OpenVINO-native INT8 graph made by NNCF (``nncf.quantize``), the quantiser OpenVINO users
already trust, from the same FP32 ONNX graph and calibration inputs as the Q/DQ graph.

The Q/DQ ONNX graph stays the TensorRT / ONNX Runtime artifact; this one is what ``ov/int8`` runs
when a bundle has it. Measured on the 2D demo (Intel Xeon, AVX-512 VNNI, no AMX, OpenVINO 2026.4,
NNCF 3.4): NNCF's graph on OpenVINO rel L2 0.0067 / mask Dice 0.997 against FP32, the Q/DQ graph
on OpenVINO 0.166 / 0.991. The layers kept in float in the Q/DQ graph (attention gates' psi
convolutions, the logits head) are NNCF's ignored scope too. With ``--max-dice-drop`` it is NNCF's
accuracy control (``nncf.quantize_with_accuracy_control``) with the golden set's mean Dice against
the reference as the validation function. NNCF quantises the graph with each nearest x2 upsample +
3x3 convolution rewritten as one transposed convolution (``build/upconv.py``, exact in float).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.segmenter import Segmenter


def nncf_available() -> bool:
    """True when OpenVINO and NNCF import here: installed is not enough (a broken NNCF install, or
    one built against another OpenVINO, fails only on import), and an import error found after
    calibration would cost minutes and say "verification failed"."""
    import importlib

    try:
        for name in ("openvino", "nncf"):
            importlib.import_module(name)
    except Exception:  # ImportError, or whatever a half-installed package raises while importing
        return False
    return True


@dataclass(frozen=True)
class DiceTarget:
    """``--max-dice-drop`` for NNCF's accuracy control: held-out images (model space, padded to the
    divisor), the reference's masks of them, the Segmenter that makes masks, and the largest
    mean-Dice drop allowed."""

    images: list[tuple[np.ndarray, tuple[int, ...]]]  # (padded [1, C, ...], original spatial size)
    reference_masks: list[np.ndarray]
    segmenter: Segmenter
    max_drop: float

    def validate(self, compiled: Any, items: Iterable[Any]) -> tuple[float, list[float]]:
        """NNCF's validation function: mean Dice of the model's masks against the reference's,
        and each image's Dice (NNCF ranks the layers to return to float by them)."""
        from attunet_deploy.metrics import per_image_overlap

        seg = self.segmenter
        dices = []
        for index in items:
            x, size = self.images[int(index)]
            logits = seg.crop(np.asarray(next(iter(compiled(x).values())), np.float32), size)
            mask = seg.masks(logits)
            ref = self.reference_masks[int(index)]
            dices += per_image_overlap(mask, ref, max(2, int(logits.shape[1])))[0]
        return float(np.mean(dices)), [float(d) for d in dices]


def quantize_openvino(src: Path, xml: Path, bin_path: Path, calib_inputs: list[np.ndarray],
                      ignored: list[str], target: DiceTarget | None = None) -> dict[str, Any]:
    """Write NNCF's INT8 of ``src`` to ``xml``/``bin_path`` (default preset, ``ignored`` node names kept
    in float); with ``target``, ``nncf.quantize_with_accuracy_control`` returns layers to float
    until the held-out images' mean Dice against the reference drops at most ``target.max_drop``.
    Returns what the manifest records of it."""
    import logging

    import nncf
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.ERROR)  # its progress bars and notes are not our output
    core = ov.Core()
    model, rewritten = _read_rewritten(core, src)
    names = {op.get_friendly_name() for op in model.get_ops()}
    scope = [n for n in ignored if n in names]
    scope_obj = nncf.IgnoredScope(names=scope, validate=False)
    control: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # NNCF draws its own progress bars: the step line around this call is ours
        if target is None:
            quantized = nncf.quantize(model, nncf.Dataset(calib_inputs), subset_size=len(calib_inputs),
                                      ignored_scope=scope_obj)
        else:
            # Items are indices into the held-out images: the validation function gets the index
            # (to find the reference mask), the model gets the padded image.
            validation = nncf.Dataset(list(range(len(target.images))), lambda i: target.images[int(i)][0])
            quantized = nncf.quantize_with_accuracy_control(
                model, nncf.Dataset(calib_inputs), validation, target.validate, max_drop=target.max_drop,
                drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib_inputs), ignored_scope=scope_obj)
            compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            metric, _ = target.validate(compiled, range(len(target.images)))
            control = {"accuracy_control": {"max_drop": target.max_drop, "metric": "mean Dice vs the reference",
                                            "images": len(target.images), "mean_dice": metric}}
    tmp_xml = xml.with_name(xml.name + ".tmp.xml")
    ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
    tmp_xml.replace(xml)
    tmp_xml.with_suffix(".bin").replace(bin_path)
    return {"quantizer": "nncf", "nncf": nncf.__version__, "openvino": ov.__version__, "preset": "default",
            "ignored_scope": scope, "calibration_images": len(calib_inputs),
            "rewrites": {"upsample_conv_to_conv_transpose": rewritten}, **control}


def _read_rewritten(core: Any, src: Path) -> tuple[Any, list[str]]:
    """The FP32 graph as OpenVINO reads it, each nearest x2 upsample + 3x3 conv made one transposed
    convolution first (``build/upconv.py``: exact, about 17 % less work on the demo); the names of the
    convolutions rewritten."""
    import onnx

    from attunet_deploy.build.upconv import rewrite_upsample_convs

    graph = onnx.load(str(src))
    rewritten = rewrite_upsample_convs(graph)
    if not rewritten:
        return core.read_model(str(src)), []
    return core.read_model(graph.SerializeToString()), rewritten
