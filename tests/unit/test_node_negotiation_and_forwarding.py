"""The node's settings for real PACS (no network): which SOP classes it negotiates
(--accept-sop-classes), where results go (--forward with TLS, --forward-stow with credentials from
the environment or a file), each bad value one InputError naming its flag. The behaviour on the
wire is in tests/system/test_dicom_node_pacs.py (Orthanc) and test_dicom_node_pdu_limits.py.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")

from attunet_deploy.apps.dicom.config import ForwardTls, NodeConfig, StowTarget, parse_sop_classes
from attunet_deploy.apps.dicom.scp import make_ae
from attunet_deploy.apps.dicom.stow import authorization
from attunet_deploy.errors import InputError

CT, MR, DOSE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.88.67"


def negotiated(mode: str) -> set[str]:
    return {str(cx.abstract_syntax) for cx in make_ae(NodeConfig(accept_sop_classes=mode)).supported_contexts}


def test_every_storage_class_by_default_ct_only_strictly_or_a_list() -> None:
    every = negotiated("all")
    assert {CT, MR, DOSE, "1.2.840.10008.1.1"} <= every and len(every) > 150
    assert negotiated("ct") == {CT, "1.2.840.10008.1.1"}
    assert negotiated("MRImageStorage, " + DOSE) == {CT, MR, DOSE, "1.2.840.10008.1.1"}
    assert parse_sop_classes("all") is None and parse_sop_classes("CT") == ()


@pytest.mark.parametrize("bad", ["MRImageStorge", "1.2.3.4", "VerificationSOPClass", ""])
def test_an_unknown_sop_class_is_one_line_naming_the_flag(bad: str) -> None:
    with pytest.raises(InputError, match="not a storage SOP class") as err:
        NodeConfig(accept_sop_classes=bad)
    assert err.value.field == "accept_sop_classes"


def test_forward_destinations_are_checked_when_the_node_is_configured(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("not checked here: ssl loads it when the sender is made")
    with pytest.raises(InputError, match="not both"):
        NodeConfig(forward="PACS@10.0.0.5:104", forward_stow=StowTarget("https://pacs/dicom-web"))
    with pytest.raises(InputError, match="give --forward"):
        NodeConfig(forward_tls=ForwardTls(ca=str(pem)))
    with pytest.raises(InputError, match="both --forward-tls-cert and --forward-tls-key"):
        ForwardTls(cert=str(pem))
    with pytest.raises(InputError, match="not a readable file"):
        ForwardTls(ca=str(tmp_path / "missing.pem"))
    for url, says in (("ftp://pacs/dicom-web", r"http\(s\)"), ("https://user:pw@pacs/dicom-web", "not go in the URL"),
                      ("pacs/dicom-web", r"http\(s\)")):
        with pytest.raises(InputError, match=says):
            StowTarget(url)
    for auth in ("token", "vault:x", "env:"):
        with pytest.raises(InputError, match="env:NAME or file:PATH"):
            StowTarget("https://pacs/dicom-web", auth)


def test_credentials_come_from_the_environment_or_a_file_as_basic_or_bearer(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOW_SECRET", "user:pa ss:word")
    assert authorization("env:STOW_SECRET") == "Basic " + base64.b64encode(b"user:pa ss:word").decode()
    token = tmp_path / "token"
    token.write_text("eyJhbGciOi.payload.sig\n")
    assert authorization(f"file:{token}") == "Bearer eyJhbGciOi.payload.sig"
    token.write_text("Bearer abc")
    assert authorization(f"file:{token}") == "Bearer abc"
    monkeypatch.delenv("STOW_SECRET")
    with pytest.raises(InputError, match="not set"):
        authorization("env:STOW_SECRET")
    token.write_text("a\x00b")
    with pytest.raises(InputError, match="control characters"):
        authorization(f"file:{token}")
    token.write_bytes(b"x" * 20000)
    with pytest.raises(InputError, match="not a credential"):
        authorization(f"file:{token}")
