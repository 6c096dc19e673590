"""Which series are segmented: the series acceptance gate of ``serve-dicom`` and ``predict --dicom-seg``.

With ``--accept RULES.json`` (MONAI Deploy's selection-rule format), a series is segmented when it
meets every condition of at least one selection::

    {"selections": [{"name": "axial CT", "conditions": {"Modality": "(?i)CT",
        "ImageType": ["PRIMARY", "AXIAL"], "SeriesDescription": "abdomen", "SliceThickness": ">=2"}}]}

- a string: equal, ignoring case, or else a regular expression found in the value (``re.search``);
- a list: every listed value is one of the attribute's values (ignoring case);
- a number: equal; a string ``">=2.0"``, ``"<5"``, ``"!=3"``, ``"==1"``: a numeric comparison;
- keys are DICOM keywords (read from the series' first instance) or ``orientation``
  (``axial``, ``coronal`` or ``sagittal``, from ImageOrientationPatient) and ``slices`` (the count).

Without rules, built-in defaults refuse what a scanner pushes beside the series a model was made for:
localizers (scouts), DERIVED or SECONDARY images (reformats, MIPs), MIPs by name, a slice orientation
more than 10 degrees off the bundle's (axial unless its input profile says otherwise), and too few
slices (one image; for a 3D model, less than half its window deep). Every refusal names its rule.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attunet_deploy import limits
from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import InputError
from attunet_deploy.io.dicom import Instance

ORIENTATIONS = ("axial", "coronal", "sagittal")
#: Keys a rule may use beside DICOM keywords.
COMPUTED_KEYS = ("orientation", "slices")
#: Built-in defaults: a slice normal this far off the bundle's axis is another orientation.
MAX_TILT_DEG = 10.0
_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
_COMPARE = re.compile(r"^\s*(>=|<=|!=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, "!=": operator.ne,
                                                   "==": operator.eq, ">": operator.gt, "<": operator.lt}


@dataclass(frozen=True)
class SeriesFacts:
    """What the gate reads of a series: its first instance's header, how many slices it has, and
    its slice normal (from ImageOrientationPatient; None when absent)."""

    header: Any
    slices: int
    normal: tuple[float, float, float] | None

    @classmethod
    def of(cls, header: Any, slices: int) -> SeriesFacts:
        from attunet_deploy.io.dicom import _floats

        o = _floats(getattr(header, "ImageOrientationPatient", None), 6)
        if o is None:
            return cls(header, slices, None)
        n = (o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3])
        norm = math.sqrt(sum(v * v for v in n))
        return cls(header, slices, tuple(v / norm for v in n) if norm > 1e-6 else None)  # type: ignore[arg-type]

    @property
    def orientation(self) -> str:
        """axial, coronal or sagittal: the patient axis the slice normal is closest to."""
        if self.normal is None:
            return "unknown"
        return ORIENTATIONS[[2, 1, 0].index(max(range(3), key=lambda i: abs(self.normal[i])))]  # type: ignore[index]

    def degrees_off(self, orientation: str) -> float | None:
        if self.normal is None:
            return None
        return math.degrees(math.acos(min(1.0, abs(self.normal[_AXIS[orientation]]))))

    def value(self, key: str) -> Any:
        """A condition key's value: computed keys, else the attribute (multi-valued: a list of strings)."""
        if key == "orientation":
            return self.orientation
        if key == "slices":
            return self.slices
        try:
            v = getattr(self.header, key, None)
        except Exception:  # a malformed element raises on access
            return None
        if v is None or v == "":
            return None
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            return [str(x).strip() for x in v]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        return str(v).strip()


@dataclass(frozen=True)
class Verdict:
    """Segment the series or not; the rule that decided and why, in one line."""

    accepted: bool
    rule: str = ""
    reason: str = ""


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _show(value: Any) -> str:
    return "\\".join(value) if isinstance(value, list) else str(value)


@dataclass(frozen=True)
class Condition:
    """One ``key: expected`` of a selection, checked when the rules are loaded."""

    key: str
    expected: Any
    pattern: re.Pattern[str] | None = None

    @classmethod
    def parse(cls, key: Any, expected: Any, where: str) -> Condition:
        from pydicom.datadict import tag_for_keyword

        if not isinstance(key, str) or (key not in COMPUTED_KEYS and tag_for_keyword(key) is None):
            raise InputError(f"{where}: unknown condition key {str(key)[:40]!r}: a DICOM keyword (e.g. "
                             f"SeriesDescription) or one of {', '.join(COMPUTED_KEYS)}", field="accept")
        if key == "orientation" and (not isinstance(expected, str) or expected.lower() not in ORIENTATIONS):
            raise InputError(f"{where}: orientation must be {', '.join(ORIENTATIONS)}", field="accept")
        if isinstance(expected, bool) or not isinstance(expected, (str, int, float, list)) or (
                isinstance(expected, list) and (not expected or not all(isinstance(v, str) for v in expected))):
            raise InputError(f"{where}: {key} must be a string, a number, a comparison such as \">=2\" or a "
                             "non-empty list of strings", field="accept")
        pattern = None
        if isinstance(expected, str) and not _COMPARE.match(expected):
            try:
                pattern = re.compile(expected)
            except re.error as exc:
                raise InputError(f"{where}: {key} {expected[:60]!r} is not a regular expression ({exc})",
                                 field="accept") from None
        return cls(key, expected, pattern)

    def fails(self, facts: SeriesFacts) -> str | None:
        """Why the series does not meet this condition (None when it does)."""
        v = facts.value(self.key)
        e = self.expected
        if v is None:
            return f"has no {self.key}"
        if isinstance(e, list):
            have = {x.lower() for x in (v if isinstance(v, list) else [str(v)])}
            missing = [x for x in e if x.lower() not in have]
            return f"{self.key} {_show(v)} lacks {', '.join(missing)}" if missing else None
        if isinstance(e, (int, float)):
            return None if _number(v) == float(e) else f"{self.key} {_show(v)} is not {e:g}"
        m = _COMPARE.match(e)
        if m:
            num = _number(v)
            ok = num is not None and _OPS[m.group(1)](num, float(m.group(2)))
            return None if ok else f"{self.key} {_show(v)} is not {m.group(1)}{m.group(2)}"
        text = _show(v)
        if text.lower() == e.lower() or (self.pattern is not None and self.pattern.search(text)):
            return None
        return f"{self.key} {text[:60]!r} does not match {e!r}"


@dataclass(frozen=True)
class Selection:
    name: str
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Gate:
    """The series acceptance gate: ``selections`` from a rules file, or the built-in defaults (None)."""

    selections: tuple[Selection, ...] | None = None
    orientation: str = "axial"
    min_slices: int = 2
    source: str = ""  # where the selections came from, for messages

    @property
    def described(self) -> str:
        return self.source or ("built-in defaults" if self.selections is None else "acceptance rules")

    @classmethod
    def for_bundle(cls, bundle: Bundle, rules: str | Path | None = None) -> Gate:
        """The gate for ``bundle``: its orientation (input profile) and the fewest slices its model can use."""
        window = bundle.sliding_window
        # half a 3D window deep, in model voxels (decide() converts it to the series' own spacing)
        min_slices = max(2, math.ceil(window.roi[0] / 2)) if window is not None else 2
        selections = load_rules(rules) if rules is not None else None
        return cls(selections, bundle.input_profile.orientation, min_slices,
                   f"rules file {Path(rules).name}" if rules is not None else "built-in defaults")

    def decide(self, facts: SeriesFacts, model_z_mm: float | None = None, series_z_mm: float | None = None
               ) -> Verdict:
        if self.selections is not None:
            return self._by_rules(facts)
        return self._by_defaults(facts, model_z_mm, series_z_mm)

    def _by_rules(self, facts: SeriesFacts) -> Verdict:
        why = []
        for sel in self.selections or ():
            failed = next((f for c in sel.conditions if (f := c.fails(facts)) is not None), None)
            if failed is None:
                return Verdict(True, f"selection {sel.name!r}", "")
            why.append(f"{sel.name!r}: {failed}")
        return Verdict(False, "accept-rules", f"matches no selection of the {self.described} ({'; '.join(why)})"[:400])

    def _by_defaults(self, facts: SeriesFacts, model_z_mm: float | None, series_z_mm: float | None) -> Verdict:
        image_type = [t.upper() for t in (facts.value("ImageType") or [])]
        if "LOCALIZER" in image_type or "SCOUT" in image_type:
            return Verdict(False, "localizer", f"ImageType {_show(image_type)}: a localizer (scout)")
        if image_type[:1] == ["DERIVED"] or image_type[1:2] == ["SECONDARY"]:
            return Verdict(False, "derived", f"ImageType {_show(image_type)}: a derived or secondary image (a "
                           "reformat, MIP or screen capture), not the acquired series")
        description = str(facts.value("SeriesDescription") or "")
        mip = re.search(r"\b(MIP|MinIP|MaxIP)\b", description, re.IGNORECASE)
        if any(t in ("MIP", "MINIP", "MAXIP") for t in image_type) or mip:
            return Verdict(False, "mip", f"a maximum/minimum intensity projection ({description or _show(image_type)})")
        off = facts.degrees_off(self.orientation)
        if off is not None and off > MAX_TILT_DEG:
            return Verdict(False, "orientation", f"{facts.orientation} slices, {off:.0f} degrees off the model's "
                           f"{self.orientation} (at most {MAX_TILT_DEG:g})")
        need = self.min_slices
        if model_z_mm and series_z_mm and self.min_slices > 2:  # a 3D window is in model voxels: in the series' own
            need = max(2, math.ceil(self.min_slices * model_z_mm / series_z_mm))
        if facts.slices < need:
            return Verdict(False, "slices", f"{facts.slices} slice(s); the model needs at least {need}")
        return Verdict(True, "built-in defaults", "")


def load_rules(path: str | Path) -> tuple[Selection, ...]:
    """The selections of a rules file; InputError (one line, naming the fault) for anything else."""
    p = Path(path)
    where = f"rules file {p}"
    raw = limits.read_bounded(p, limits.MANIFEST, "rules file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{where} is not JSON ({str(exc)[:80]})", field="accept") from None
    sels = data.get("selections") if isinstance(data, dict) else None
    if not isinstance(sels, list) or not sels:
        raise InputError(f"{where}: expected {{\"selections\": [{{\"name\": ..., \"conditions\": {{...}}}}, ...]}}",
                         field="accept")
    out = []
    for i, sel in enumerate(sels):
        if not isinstance(sel, dict) or not isinstance(sel.get("conditions"), dict) or not sel["conditions"]:
            raise InputError(f"{where}: selection {i + 1} needs a non-empty \"conditions\" object", field="accept")
        unknown = set(sel) - {"name", "conditions"}
        if unknown:
            raise InputError(f"{where}: selection {i + 1} has unknown field(s) {', '.join(sorted(unknown))[:60]}",
                             field="accept")
        name = str(sel.get("name", f"selection {i + 1}"))[:64]
        out.append(Selection(name, tuple(Condition.parse(k, v, f"{where}, selection {name!r}")
                                         for k, v in sel["conditions"].items())))
    return tuple(out)


def series_z(instances: list[Instance]) -> float | None:
    """The median gap between slices along their normal (mm), where positions say it."""
    from attunet_deploy.io.dicom_series import slice_gaps

    gaps = slice_gaps(instances)
    return float(sorted(gaps)[len(gaps) // 2]) if gaps else None
