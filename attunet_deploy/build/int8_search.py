"""Accuracy-aware INT8: return the most sensitive convolutions to float until the held-out
images meet a Dice target (``quantize --max-dice-drop``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attunet_deploy.build.int8 import quantize_int8, revert_units
from attunet_deploy.console import Reporter
from attunet_deploy.errors import VerificationFailed

#: The validation function: an INT8 graph's path -> (mean Dice vs the reference, p50 latency in ms).
Evaluate = Callable[[Path], tuple[float, float]]


def accuracy_aware_int8(src: Path, dst: Path, ranges: Any, *, method: str, target: float, evaluate: Evaluate,
                        quantize_all: bool = False, full_range_weights: bool = False,
                        reporter: Reporter | None = None, allow_float: bool = False) -> dict[str, Any]:
    """Quantise, and while the held-out images' mean Dice vs FP32 misses ``target``, return the most
    sensitive convolutions to float one at a time (after NNCF's quantize_with_accuracy_control,
    which also takes the validation function as an argument).

    Sensitivity of a convolution = the mean Dice gained by keeping only it in float. Writes the
    final graph to ``dst``; returns the record for the manifest (every step's float layers, Dice
    and latency). Raises VerificationFailed when even all convolutions in float miss the target, and
    when the target is met only with every convolution in float (not an INT8 graph at all) unless
    ``allow_float``.
    """
    reporter = reporter or Reporter()
    if target >= 1.0:
        reporter.notice("note:", "a Dice drop of 0 asks INT8 to equal FP32 on every held-out pixel: the search will "
                        "likely return every convolution to float (then exit 1 unless --allow-float)")
    kw = {"method": method, "quantize_all": quantize_all, "full_range_weights": full_range_weights,
          "ranges": ranges}
    info = quantize_int8(src, dst, **kw)
    dice, ms = evaluate(dst)
    steps: list[dict[str, Any]] = [{"float_added": [], "mean_dice": dice, "latency_ms": ms}]
    record = {"target_mean_dice": target, "steps": steps, "reverted": []}
    if dice >= target:
        reporter.info(f"INT8 mean Dice {dice:.4f} >= {target:.4f}: no convolution returned to float")
        return {**info, "accuracy_aware": record}
    units = revert_units(dst)
    gains = []
    with tempfile.TemporaryDirectory(prefix="attdeploy-aa-") as tmp, \
            reporter.progress(f"Ranking {len(units)} convolutions by sensitivity (Dice {dice:.4f} < {target:.4f})",
                              len(units)) as advance:
        for unit in units:
            trial = Path(tmp) / "trial.onnx"
            quantize_int8(src, trial, extra_float=list(unit), **kw)
            gains.append((evaluate(trial)[0] - dice, unit))
            advance()
    ranking = [u for _, u in sorted(gains, key=lambda g: (-g[0], g[1]))]
    record["sensitivity"] = [{"convs": list(u), "dice_gain": g} for g, u in sorted(gains, key=lambda g: -g[0])]
    reverted: list[str] = []
    for unit in ranking:
        added = [c for c in unit if c not in reverted]
        if not added:
            continue
        reverted += added
        info = quantize_int8(src, dst, extra_float=reverted, **kw)
        dice, ms = evaluate(dst)
        steps.append({"float_added": added, "mean_dice": dice, "latency_ms": ms})
        reporter.info(f"  + {', '.join(added)} in float: mean Dice {dice:.4f}, {ms:.1f} ms")
        if dice >= target:
            record["reverted"] = list(reverted)
            if len(reverted) >= len({c for u in units for c in u}) and not allow_float:
                raise VerificationFailed(f"INT8 reached mean Dice {target:.4f} only with every one of the "
                                         f"{len(reverted)} convolutions in float: that is not an INT8 graph, and "
                                         "nothing was written; "
                                         "allow a larger --max-dice-drop, or pass --allow-float to keep it anyway")
            return {**info, "accuracy_aware": record}
    raise VerificationFailed(f"INT8 cannot reach mean Dice {target:.4f} on the held-out images even with all "
                             f"{len(reverted)} convolutions in float (best {max(s['mean_dice'] for s in steps):.4f}); "
                             "nothing was written: calibrate on more representative images or keep FP16")
