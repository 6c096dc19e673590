"""``attdeploy predict``.
"""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import (
    RUN_PRECISIONS,
    backend_choice,
    bundle_option,
    load_bundle,
    reporter,
    require_extra,
    resolve_precision,
    runner_options,
    triton_options,
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
@click.option("--dicom-seg", is_flag=True, help="INPUTS are CT series: write one DICOM Segmentation per series.")
@click.option("--segment-label", default="Target", show_default=True, help="DICOM SEG segment label.")
@triton_options
def predict(bundle_dir: str, inputs: tuple[str, ...], out: str, backend: str, precision: str,
            no_overlay: bool, overwrite: bool, dicom_seg: bool, segment_label: str, triton_url: str | None,
            triton_model: str | None, triton_timeout: float | None) -> None:
    """Segment images (.npy/.npz, PNG/TIFF, DICOM, NIfTI): masks plus an overlay PNG per image,
    or with --dicom-seg one DICOM SEG per CT series."""
    from attunet_deploy.outputs import check_output

    check_output(out, "-o", kind="dir", bundles=[bundle_dir])
    bundle = load_bundle(bundle_dir)
    opts = runner_options(triton_url, triton_model, triton_timeout)
    backend, precision = resolve_precision(bundle, backend, precision, **opts)
    if dicom_seg:
        require_extra("predict --dicom-seg", ("pydicom", "highdicom"), "dicom")
        from attunet_deploy.apps.dicom.files import predict_series_folder

        rows = predict_series_folder(bundle, list(inputs), out, backend=backend, precision=precision,
                                     overwrite=overwrite, segment_label=segment_label, reporter=reporter(), **opts)
        print_segs(rows, out)
        return
    from attunet_deploy.apps.predict import predict_files

    results = predict_files(bundle, list(inputs), out, backend=backend, precision=precision,
                            overlay=not no_overlay, overwrite=overwrite, reporter=reporter(), **opts)
    print_masks(results, out)
