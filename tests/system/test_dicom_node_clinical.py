"""The node at the scanner, clinically: a whole study arrives (axial series, scout, MIP, coronal
reformat, 1-slice series) and only the axial series is segmented, every other one refused with an
event naming its rule and a counter; a rules file chooses series the same way as in ``predict``; and
the four outputs (SEG, RTSTRUCT, Secondary Capture overlay, SR) reach a real PACS, Orthanc, which
files them under the CT's study.

Senders are DCMTK's storescu and Orthanc itself (its "send to modality"); the PACS is Orthanc 1.10
with its DICOMweb plugin, started on free ports with its own configuration and stopped by pid
(tests/orthanc.py). No mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("skimage")

from dicomnet import (
    STUDY_OTHERS,
    events,
    free_port,
    http_get,
    metric,
    need_tools,
    node,
    storescu,
    wait_for,
    write_study,
)
from orthanc import Orthanc, available

from attunet_deploy.demo.ctseries import SeriesGeometry, SeriesHeader, write_ct_series

SOP = {"seg": "1.2.840.10008.5.1.4.1.1.66.4", "rtstruct": "1.2.840.10008.5.1.4.1.1.481.3",
       "sc": "1.2.840.10008.5.1.4.1.1.7", "sr": "1.2.840.10008.5.1.4.1.1.88.34"}


def series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def refusals(log: Path) -> dict[str, str]:
    """Series UID -> the rule that refused it, from the node's JSON event log."""
    return {e["series"]: e["rule"] for e in events(log) if e["event"] == "refused-series"}


def test_only_the_axial_series_of_a_study_is_segmented_others_refused_by_rule(demo_bundle: Path, tmp_path: Path
                                                                              ) -> None:
    need_tools("storescu")
    study = write_study(tmp_path / "study")
    files = [s.path for name in study for s in study[name]]
    hp = free_port()
    out = tmp_path / "out"
    with node(demo_bundle, out, "--log-json", "--http-port", str(hp)) as (port, log, _):
        assert storescu(port, *files) == ["0x0000"] * len(files)  # one association, the whole study
        wait_for(lambda: len(refusals(log)) == len(STUDY_OTHERS) and list((out / "seg").glob("*.dcm")), 120,
                 "the axial SEG and a refusal per other series")
        _, text = http_get(hp, "/metrics")
    expected = {series_uid(study[name][0].path): rule for name, rule in STUDY_OTHERS.items()}
    assert refusals(log) == expected
    assert all(e["reason"] and e["instances"] >= 1 for e in events(log) if e["event"] == "refused-series")
    for rule in STUDY_OTHERS.values():
        assert metric(text, "attdeploy_series_refused_total", rule=rule) == 1
    assert metric(text, "attdeploy_series_qa_total", status="ok") == 1
    (seg,) = (out / "seg").glob("*.dcm")
    ds = pydicom.dcmread(seg, stop_before_pixels=True)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid(study["axial"][0].path)
    written = [e for e in events(log) if e["event"] == "written"]
    assert len(written) == 1 and written[0]["qa"] == "ok" and written[0]["qa_reasons"] == []


def test_a_rules_file_chooses_series_in_the_node_as_in_predict(demo_bundle: Path, tmp_path: Path) -> None:
    need_tools("storescu")
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"selections": [{"name": "abdomen, 2 mm or thicker", "conditions": {
        "Modality": "CT", "SeriesDescription": "(?i)^abdomen\\b", "SliceThickness": ">=2"}}]}))
    made = {name: write_ct_series(tmp_path / name, 4, (96, 96), header=SeriesHeader(series_description=text),
                                  geometry=SeriesGeometry(spacing=thickness))
            for name, thickness, text in (("thick", 2.5, "Abdomen 2.5mm"), ("thin", 1.0, "Abdomen 1mm"),
                                          ("chest", 2.5, "Chest 2.5mm"))}
    out = tmp_path / "out"
    with node(demo_bundle, out, "--log-json", "--accept", str(rules)) as (port, log, _):
        for slices in made.values():
            assert storescu(port, *(s.path for s in slices)) == ["0x0000"] * 4
        wait_for(lambda: len(refusals(log)) == 2 and list((out / "seg").glob("*.dcm")), 120,
                 "the SEG of the thick series and two refusals")
    got = refusals(log)
    assert got == {series_uid(made["thin"][0].path): "accept-rules", series_uid(made["chest"][0].path): "accept-rules"}
    reasons = {e["series"]: e["reason"] for e in events(log) if e["event"] == "refused-series"}
    assert "SliceThickness 1.0 is not >=2" in reasons[series_uid(made["thin"][0].path)]
    assert "does not match" in reasons[series_uid(made["chest"][0].path)]
    (seg,) = (out / "seg").glob("*.dcm")
    ref = pydicom.dcmread(seg, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID
    assert ref == series_uid(made["thick"][0].path)


def test_orthanc_pushes_a_study_and_files_all_four_outputs_under_it(demo_bundle: Path, tmp_path: Path) -> None:
    why = available()
    if why:
        pytest.skip(why)
    study = write_study(tmp_path / "study", axial_slices=12)
    study_uid = str(pydicom.dcmread(study["axial"][0].path, stop_before_pixels=True).StudyInstanceUID)
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", {"NODE": ("ATTDEPLOY", "127.0.0.1", node_port)})
    with pacs:
        ids = pacs.upload([s.path for name in study for s in study[name]])
        assert len(ids) == sum(len(v) for v in study.values())
        out = tmp_path / "out"
        with node(demo_bundle, out, "--log-json", "--outputs", "seg,rtstruct,sc,sr", "--forward",
                  f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}", port=node_port) as (_, log, _):
            pacs.push_study(pacs.study_of(study_uid), "NODE")  # Orthanc's C-STOREs: the scanner's role

            def filed() -> set[str]:
                return {i["SOPClassUID"] for i in pacs.instances_of_study(study_uid)} & set(SOP.values())

            wait_for(lambda: filed() == set(SOP.values()), 180, "SEG, RTSTRUCT, SC and SR filed by Orthanc")
        assert set(refusals(log).values()) == set(STUDY_OTHERS.values())
        ours = [i for i in pacs.instances_of_study(study_uid) if i["SOPClassUID"] in SOP.values()]
        by_class: dict[str, list[dict]] = {}
        for inst in ours:
            by_class.setdefault(inst["SOPClassUID"], []).append(inst)
        assert len(by_class[SOP["seg"]]) == len(by_class[SOP["rtstruct"]]) == len(by_class[SOP["sr"]]) == 1
        assert len(by_class[SOP["sc"]]) >= 1 and len({i["SeriesInstanceUID"] for i in ours}) == 4
        # the SEG is served back by Orthanc's DICOMweb (WADO-RS metadata) under the CT's study
        meta = pacs.get(f"/dicom-web/studies/{study_uid}/series/{by_class[SOP['seg']][0]['SeriesInstanceUID']}"
                        "/metadata")
        assert meta and meta[0]["00080016"]["Value"] == [SOP["seg"]]
