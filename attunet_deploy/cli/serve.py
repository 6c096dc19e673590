"""``attdeploy serve-dicom``.
"""

from __future__ import annotations

from dataclasses import replace

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import (
    RUN_PRECISIONS,
    backend_choice,
    bundle_option,
    load_bundle,
    require_extra,
    resolve_precision,
)


@main.command("serve-dicom")
@bundle_option
@click.option("--out", required=True, metavar="OUT", help="Folder for received instances, SEGs and the queue.")
@click.option("--port", type=int, default=11112, show_default=True, help="TCP port to listen on.")
@click.option("--ae-title", default="ATTDEPLOY", show_default=True, help="This node's AE title.")
@click.option("--bind", default="0.0.0.0", show_default=True, metavar="ADDR",
              help="Address to listen on. The default, all interfaces, is what scanners expect of a DICOM node; "
                   "use 127.0.0.1 to accept local connections only.")
@click.option("--allow-ae", multiple=True, metavar="AET", help="Accept associations only from these calling AE "
              "titles (repeatable; compared as DICOM does: case-sensitive, surrounding spaces ignored; default: any).")
@click.option("--any-called-ae", is_flag=True, help="Accept associations whatever called AE title they name "
              "(default: it must equal --ae-title).")
@click.option("--allow-host", multiple=True, metavar="ADDR[/BITS]", help="Accept connections only from these "
              "addresses or networks (repeatable; default: any).")
@click.option("--tls-cert", default=None, metavar="PEM", help="DICOM TLS (PS3.15 Annex B): this node's certificate.")
@click.option("--tls-key", default=None, metavar="PEM", help="DICOM TLS: the certificate's private key.")
@click.option("--tls-ca", default=None, metavar="PEM", help="DICOM TLS: require client certificates signed by "
              "this CA.")
@click.option("--quiet-seconds", type=float, default=5.0, show_default=True,
              help="A series is complete when none of its instances arrived for this long.")
@click.option("--forward", default=None, metavar="AET@HOST:PORT", help="Send each SEG on by C-STORE (retried with "
              "back-off; kept queued on disk until it is accepted).")
@click.option("--max-instance-mb", type=float, default=64.0, show_default=True,
              help="Larger instances are refused with 0xA700 (out of resources).")
@click.option("--min-free-mb", type=float, default=1024.0, show_default=True,
              help="Below this much free disk under --out, stores are refused with 0xA700.")
@click.option("--keep-archive", default="7", show_default=True, metavar="DAYS|none",
              help="How long archive/ (segmented instances) and sent/ keep their files; none: delete a series' "
                   "instances once its SEG is written.")
@click.option("--max-associations", type=int, default=32, show_default=True,
              help="Concurrent associations; more are rejected (transient) until one ends.")
@click.option("--acse-timeout", type=float, default=10.0, show_default=True,
              help="Seconds a connection may take to request an association (also the TLS handshake); "
                   "silent sockets are dropped after it.")
@click.option("--dimse-timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for a DIMSE message within an association.")
@click.option("--network-timeout", type=float, default=60.0, show_default=True,
              help="Seconds an idle association is kept open.")
@click.option("--http-port", type=int, default=None, metavar="PORT",
              help="Serve /healthz and Prometheus /metrics on this port (bound like --bind).")
@click.option("--log-json", is_flag=True, help="Log one JSON object per line.")
@click.option("--backend", type=backend_choice(all_=False, auto=True), default="auto",
              show_default=True)
@click.option("--precision", type=click.Choice(RUN_PRECISIONS), default="fp32", show_default=True,
              help="A precision, or best: the fastest that passes verification on this machine (measured once).")
@click.option("--segment-label", default=None, metavar="TEXT", help="Label of a one-class model's segment in DICOM "
              "outputs (default: the bundle's name for it, else Target).")
@click.option("--outputs", "outputs_text", default="seg", show_default=True, metavar="seg,rtstruct,sc,sr",
              help="Results per series: DICOM SEG, RT Structure Set, a Secondary Capture overlay series, a TID 1500 "
                   "SR with volumes and the QA flag (needs seg); each forwarded like the SEG.")
@click.option("--accept", default=None, metavar="RULES.json",
              help="Segment only series that meet these selection rules (MONAI Deploy's format); default: refuse "
                   "localizers, derived/secondary images, MIPs, other orientations and too few slices.")
@click.option("--accept-sop-classes", default="all", show_default=True, metavar="ct|all|LIST",
              help="Storage SOP classes negotiated beside CT: all (a whole-study push succeeds; instances that are "
                   "not CT are answered Success and not kept, one 'ignored' event per series), ct (strict: nothing "
                   "else is negotiated), or SOP class keywords/UIDs, comma-separated.")
@click.option("--forward-tls-ca", default=None, metavar="PEM", help="--forward over DICOM TLS: the CA that signed "
              "the PACS's certificate (a host name in --forward is checked against it).")
@click.option("--forward-tls-cert", default=None, metavar="PEM", help="--forward over TLS: this node's certificate, "
              "where the PACS requires one.")
@click.option("--forward-tls-key", default=None, metavar="PEM", help="--forward over TLS: that certificate's key.")
@click.option("--forward-stow", default=None, metavar="URL", help="Send results by DICOMweb STOW-RS to this "
              "service root (e.g. https://pacs/dicom-web), retried like --forward; instead of --forward.")
@click.option("--forward-stow-auth", default=None, metavar="env:NAME|file:PATH",
              help="Where the STOW-RS credential is: USER:PASSWORD (basic) or a bearer token; never on the command "
                   "line.")
@click.option("--forward-stow-ca", default=None, metavar="PEM", help="CA bundle that verifies an https STOW-RS "
              "service (default: the system's; verification is always on).")
def serve_dicom(bundle_dir: str, out: str, port: int, ae_title: str, bind: str, allow_ae: tuple[str, ...],
                any_called_ae: bool, allow_host: tuple[str, ...], tls_cert: str | None, tls_key: str | None,
                tls_ca: str | None, quiet_seconds: float, forward: str | None, max_instance_mb: float,
                min_free_mb: float, keep_archive: str, max_associations: int, acse_timeout: float,
                dimse_timeout: float, network_timeout: float, http_port: int | None, log_json: bool, backend: str,
                precision: str, segment_label: str | None, outputs_text: str, accept: str | None,
                accept_sop_classes: str, forward_tls_ca: str | None, forward_tls_cert: str | None,
                forward_tls_key: str | None, forward_stow: str | None, forward_stow_auth: str | None,
                forward_stow_ca: str | None) -> None:
    """A DICOM node beside the scanner: CT series in by C-STORE, a DICOM SEG out per series.

    Each CT instance is checked (UIDs, pixel data, size) and on disk before Success is returned; an
    unusable one gets a failure status; instances of other SOP classes in a study are answered and
    ignored (--accept-sop-classes). Stop with SIGTERM (or Ctrl-C): unfinished
    work is picked up on the next start.
    """
    require_extra("serve-dicom", ("pydicom", "pynetdicom", "highdicom"), "dicom")
    from attunet_deploy.apps.dicom.config import ForwardTls, StowTarget
    from attunet_deploy.apps.dicom.node import DicomNode, NodeConfig, NodeLimits, parse_keep

    limits = NodeLimits(max_instance_mb=max_instance_mb, min_free_mb=min_free_mb,
                        keep_archive_days=parse_keep(keep_archive), max_associations=max_associations,
                        acse_timeout=acse_timeout, dimse_timeout=dimse_timeout, network_timeout=network_timeout)
    config = NodeConfig(port=port, ae_title=ae_title, bind=bind, allow_ae=allow_ae, any_called_ae=any_called_ae,
                        allow_host=allow_host, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
                        quiet_seconds=quiet_seconds, forward=forward, http_port=http_port, log_json=log_json,
                        backend=backend, precision=precision, segment_label=segment_label, limits=limits,
                        outputs=tuple(outputs_text.split(",")), accept=accept,
                        accept_sop_classes=accept_sop_classes,
                        forward_tls=ForwardTls(forward_tls_ca, forward_tls_cert, forward_tls_key)
                        if forward_tls_ca or forward_tls_cert or forward_tls_key else None,
                        forward_stow=StowTarget(forward_stow, forward_stow_auth, forward_stow_ca)
                        if forward_stow else None)
    bundle = load_bundle(bundle_dir)
    backend, precision = resolve_precision(bundle, backend, precision)
    DicomNode(bundle, out, replace(config, backend=backend, precision=precision)).serve()
