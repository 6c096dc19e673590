"""The node against a real PACS, Orthanc 1.10 with its DICOMweb plugin (tests/orthanc.py: started
on free ports with its own configuration and storage, stopped by pid): a whole study of mixed SOP
classes pushed by Orthanc with strict transcoding; results forwarded over DICOM TLS and over
STOW-RS with basic authentication, each surviving the PACS being down for 20 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from dicomnet import (
    OTHER_OBJECTS,
    events,
    free_port,
    http_get,
    make_certs,
    metric,
    need_tools,
    node,
    storescu,
    wait_for,
    write_other_objects,
)
from orthanc import Orthanc, available

from attunet_deploy.demo.ctseries import SeriesHeader, write_ct_series

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
OUTAGE_S = 20.0


@pytest.fixture(autouse=True)
def _orthanc() -> None:
    why = available()
    if why:
        pytest.skip(why)


def ct_series(folder: Path, n: int = 6) -> list:
    return write_ct_series(folder, n, (96, 96), header=SeriesHeader(series_description="Abdomen 2.5mm"))


def segs_in(pacs: Orthanc, study_uid: str) -> list[dict]:
    return [i for i in pacs.instances_of_study(study_uid) if i["SOPClassUID"] == SEG_STORAGE]


def test_whole_study_push_of_mixed_sop_classes_succeeds_and_only_ct_is_segmented(demo_bundle: Path,
                                                                                 tmp_path: Path) -> None:
    slices = ct_series(tmp_path / "ct")
    others = write_other_objects(tmp_path / "others", slices[0].path)
    study_uid = str(pydicom.dcmread(slices[0].path, stop_before_pixels=True).StudyInstanceUID)
    node_port, hp = free_port(), free_port()
    with Orthanc(tmp_path / "orthanc", {"NODE": ("ATTDEPLOY", "127.0.0.1", node_port)}) as pacs:
        pacs.upload([s.path for s in slices] + [p for paths in others.values() for p in paths])
        with node(demo_bundle, tmp_path / "out", "--log-json", "--http-port", str(hp), "--forward",
                  f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}", port=node_port) as (_, log, _):
            job = pacs.push_study(pacs.study_of(study_uid), "NODE", permissive=False)  # strict: any failure fails
            assert isinstance(job, dict) and job.get("FailedInstancesCount", 0) == 0, job
            wait_for(lambda: segs_in(pacs, study_uid), 120, "the SEG in Orthanc")
            _, text = http_get(hp, "/metrics")
        ignored = [e for e in events(log) if e["event"] == "ignored"]
        assert {(e["sop_class"], e["modality"], e["instances"]) for e in ignored} == \
            {(uid, modality, 2) for uid, modality in OTHER_OBJECTS.values()}
        assert metric(text, "attdeploy_instances_ignored_total", sop_class="MRImageStorage") == 2
        assert metric(text, "attdeploy_instances_received_total") == len(slices)
        kept = {p.stem for folder in ("incoming", "archive") for p in (tmp_path / "out" / folder).rglob("*.dcm")}
        assert kept == {s.sop_instance_uid for s in slices}  # nothing but the CT is kept


def test_forwarding_over_dicom_tls_and_over_stow_rs_survives_a_pacs_outage(demo_bundle: Path, tmp_path: Path
                                                                           ) -> None:
    """One PACS that speaks DICOM only over TLS (client certificate required) and DICOMweb only with
    basic authentication; two nodes, one forwarding each way; the PACS down for 20 s while both have
    results to send: both arrive once it is back."""
    need_tools("storescu")
    certs = make_certs(tmp_path)
    tls = {"cert": str(certs["server.crt"]), "key": str(certs["server.key"]), "trusted": str(certs["ca.crt"]),
           "require_client": True}
    by_tls, by_stow = ct_series(tmp_path / "ct1"), ct_series(tmp_path / "ct2")
    studies = [str(pydicom.dcmread(s[0].path, stop_before_pixels=True).StudyInstanceUID) for s in (by_tls, by_stow)]
    env = {"ATTDEPLOY_TEST_STOW": "attdeploy:s3cret pass"}
    with Orthanc(tmp_path / "orthanc", tls=tls, user=("attdeploy", "s3cret pass")) as pacs, \
            node(demo_bundle, tmp_path / "out1", "--log-json", "--forward", f"{pacs.aet}@localhost:{pacs.dicom_port}",
                 "--forward-tls-ca", str(certs["ca.crt"]), "--forward-tls-cert", str(certs["client.crt"]),
                 "--forward-tls-key", str(certs["client.key"])) as (port1, log1, _), \
            node(demo_bundle, tmp_path / "out2", "--log-json", "--forward-stow", f"{pacs.url}/dicom-web",
                 "--forward-stow-auth", "env:ATTDEPLOY_TEST_STOW", env=env) as (port2, log2, _):
        # "localhost" is checked against the PACS certificate's names (it holds DNS:localhost)
        pacs.stop()
        down = time.monotonic()
        for port, slices in ((port1, by_tls), (port2, by_stow)):
            assert storescu(port, *(s.path for s in slices)) == ["0x0000"] * len(slices)
        for log in (log1, log2):
            wait_for(lambda log=log: "retry" in log.read_text(), 60, "a failed forward while the PACS is down")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
        pacs.start()
        for study in studies:
            wait_for(lambda study=study: segs_in(pacs, study), 120, "each SEG in Orthanc after the outage")
        for log in (log1, log2):  # Orthanc files a SEG before the sender has logged its acknowledgement
            wait_for(lambda log=log: any(e["event"] == "sent" for e in events(log)), 30, "the node's sent event")
        sent1 = [e for e in events(log1) if e["event"] == "sent"]
        sent2 = [e for e in events(log2) if e["event"] == "sent"]
        assert len(sent1) == 1 and "(TLS)" in sent1[0]["message"]
        assert len(sent2) == 1 and "STOW-RS" in sent2[0]["message"]
        assert "s3cret" not in log2.read_text()  # the credential never reaches the log
        assert not list((tmp_path / "out1" / "outbox").glob("*.dcm")) and not list(
            (tmp_path / "out2" / "outbox").glob("*.dcm"))


def test_a_refused_credential_keeps_the_result_queued(demo_bundle: Path, tmp_path: Path) -> None:
    need_tools("storescu")
    slices = ct_series(tmp_path / "ct", 2)
    with Orthanc(tmp_path / "orthanc", user=("attdeploy", "right")) as pacs, \
            node(demo_bundle, tmp_path / "out", "--log-json", "--forward-stow", f"{pacs.url}/dicom-web",
                 "--forward-stow-auth", "env:ATTDEPLOY_TEST_STOW", env={"ATTDEPLOY_TEST_STOW": "attdeploy:wrong"}
                 ) as (port, log, _):
        assert storescu(port, *(s.path for s in slices)) == ["0x0000"] * 2
        wait_for(lambda: "HTTP 401" in log.read_text(), 60, "the refused credential")
        assert list((tmp_path / "out" / "outbox").glob("*.dcm"))  # kept for the next try
