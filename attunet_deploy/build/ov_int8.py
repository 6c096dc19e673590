"""An OpenVINO-native INT8 graph made by NNCF (``nncf.quantize``), the quantiser OpenVINO users
already trust, from the same FP32 ONNX graph and calibration inputs as the Q/DQ graph.

The Q/DQ ONNX graph stays the TensorRT / ONNX Runtime artifact; this one is what ``ov/int8`` runs
when a bundle has it. Measured on the 2D demo (Intel Xeon, AVX-512 VNNI, no AMX, OpenVINO 2026.4,
NNCF 3.4): NNCF's graph on OpenVINO rel L2 0.0067 / mask Dice 0.997 against FP32, the Q/DQ graph
on OpenVINO 0.166 / 0.991. The layers kept in float in the Q/DQ graph (attention gates' psi
convolutions, the logits head) are NNCF's ignored scope too.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np


def nncf_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))


def quantize_openvino(src: Path, xml: Path, bin_path: Path, calib_inputs: list[np.ndarray],
                      ignored: list[str]) -> dict[str, Any]:
    """Write NNCF's INT8 of ``src`` to ``xml``/``bin_path`` (default preset, ``ignored`` node names kept
    in float); returns what the manifest records of it."""
    import logging

    import nncf
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.ERROR)  # its progress bars and notes are not our output
    core = ov.Core()
    model = core.read_model(str(src))
    names = {op.get_friendly_name() for op in model.get_ops()}
    scope = [n for n in ignored if n in names]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # NNCF draws its own progress bars: the step line around this call is ours
        quantized = nncf.quantize(model, nncf.Dataset(calib_inputs), subset_size=len(calib_inputs),
                                  ignored_scope=nncf.IgnoredScope(names=scope, validate=False))
    tmp_xml = xml.with_name(xml.name + ".tmp.xml")
    ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
    tmp_xml.replace(xml)
    tmp_xml.with_suffix(".bin").replace(bin_path)
    return {"quantizer": "nncf", "nncf": nncf.__version__, "openvino": ov.__version__, "preset": "default",
            "ignored_scope": scope, "calibration_images": len(calib_inputs)}
