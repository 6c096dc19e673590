"""When verification proves nothing: reference masks that are empty or full on most golden images
(a random-weight or untrained model agrees with anything that is also all background), or a user
model judged on synthetic fields. Each warning is one line; verify and pipeline print them, and the
report carries them (``warnings`` in report.json, a box at the top of report.html)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attunet_deploy.bundle import Bundle
from attunet_deploy.io.golden import GoldenCase
from attunet_deploy.segmenter import Segmenter

#: More than this share of golden images with an empty or full reference mask is degenerate.
DEGENERATE_SHARE = 0.5


def degenerate_images(masks: Sequence[np.ndarray]) -> int:
    """Images whose mask is one class everywhere (all background, or all one foreground class)."""
    return sum(1 for m in masks for img in np.asarray(m).reshape(len(m), -1) if img.min() == img.max())


def golden_warnings(bundle: Bundle, cases: Sequence[GoldenCase]) -> list[str]:
    """The lines that say a verification of ``bundle`` on ``cases`` proves little."""
    out = []
    segmenter = Segmenter(bundle.spec)
    masks = [segmenter.masks(c.logits) for c in cases]
    total = sum(len(m) for m in masks)
    flat = degenerate_images(masks)
    if total and flat > DEGENERATE_SHARE * total:
        out.append(f"the reference's masks are empty or full on {flat} of {total} golden images: agreeing with them "
                   "proves little (an untrained or random-weight model?); judge on your own labelled images "
                   "(verify --images DIR --labels DIR)")
    golden = bundle.golden
    if golden.kind == "synthetic-fields" and not bundle.is_demo:
        out.append("the golden set is synthetic (smooth random fields), not images like yours: re-export with "
                   "--images DIR (a quarter is held out to judge every backend)")
    return out
