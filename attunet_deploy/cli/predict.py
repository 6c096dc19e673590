"""``attdeploy predict``.
"""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import (
    RUN_PRECISIONS,
    backend_choice,
    bundle_option,
    check_json_path,
    load_bundle,
    reporter,
    require_extra,
    resolve_precision,
    runner_options,
    triton_options,
    write_json,
)
from attunet_deploy.cli.render import print_masks, print_segs


@main.command()
@bundle_option
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", required=True, metavar="OUTDIR", help="Directory for masks and overlays.")
@click.option("--backend", type=backend_choice(all_=False, auto=True), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(RUN_PRECISIONS), default="fp32", show_default=True,
              help="A precision, or best: the fastest that passes verification on this machine (measured once).")
@click.option("--no-overlay", is_flag=True, help="Skip the overlay PNGs.")
@click.option("--overwrite", is_flag=True, help="Replace output files that exist already (refused otherwise).")
@click.option("--dicom-seg", is_flag=True, help="INPUTS are CT series: write DICOM results per series (--outputs).")
@click.option("--outputs", "outputs_text", default="seg", show_default=True, metavar="seg,rtstruct,sc,sr",
              help="With --dicom-seg: DICOM SEG, RT Structure Set, a Secondary Capture overlay series, and/or a "
                   "TID 1500 SR with volumes and the QA flag (needs seg).")
@click.option("--accept", default=None, metavar="RULES.json",
              help="With --dicom-seg: segment only series that meet these selection rules (MONAI Deploy's format); "
                   "default: refuse localizers, derived/secondary images, MIPs, other orientations, too few slices.")
@click.option("--force", is_flag=True, help="With --dicom-seg: segment series the acceptance gate refuses (their "
              "results are flagged for review).")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write the rows (with each series' QA flag) "
              "as JSON ('-': stdout).")
@click.option("--segment-label", default=None, metavar="TEXT", help="Label of a one-class model's segment in DICOM "
              "outputs (default: the bundle's name for it, else Target).")
@triton_options
def predict(bundle_dir: str, inputs: tuple[str, ...], out: str, backend: str, precision: str,
            no_overlay: bool, overwrite: bool, dicom_seg: bool, outputs_text: str, accept: str | None, force: bool,
            json_path: str | None, segment_label: str | None, triton_url: str | None, triton_model: str | None,
            triton_timeout: float | None) -> None:
    """Segment images (.npy/.npz, PNG/TIFF, DICOM, NIfTI): masks plus an overlay PNG per image,
    or with --dicom-seg DICOM results per CT series."""
    from attunet_deploy.outputs import check_output

    check_output(out, "-o", kind="dir", bundles=[bundle_dir])
    check_json_path(json_path, bundle_dir)
    series_options = None
    if dicom_seg:
        require_extra("predict --dicom-seg", ("pydicom", "highdicom"), "dicom")
        from attunet_deploy.apps.dicom.files import SeriesOptions
        from attunet_deploy.apps.dicom.gate import load_rules

        series_options = SeriesOptions(tuple(outputs_text.split(",")), accept, force, segment_label)
        if accept is not None:
            load_rules(accept)  # a bad rules file is one line before any work
    bundle = load_bundle(bundle_dir)
    opts = runner_options(triton_url, triton_model, triton_timeout)
    backend, precision = resolve_precision(bundle, backend, precision, **opts)
    if dicom_seg:
        require_extra("predict --dicom-seg", ("pydicom", "highdicom"), "dicom")
        from attunet_deploy.apps.dicom.files import predict_series_folder

        rows = predict_series_folder(bundle, list(inputs), out, backend=backend, precision=precision,
                                     overwrite=overwrite, options=series_options, reporter=reporter(), **opts)
        if json_path != "-":
            print_segs(rows, out)
        write_json(json_path, {"bundle": str(bundle.root), "series": [r.to_dict() for r in rows]})
        return
    from attunet_deploy.apps.predict import predict_files

    results = predict_files(bundle, list(inputs), out, backend=backend, precision=precision,
                            overlay=not no_overlay, overwrite=overwrite, reporter=reporter(), **opts)
    if json_path != "-":
        print_masks(results, out)
    write_json(json_path, {"bundle": str(bundle.root), "files": [r.to_dict() for r in results]})
