"""``attdeploy verify``.
"""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import (
    PRECISION_CHOICES,
    backend_choice,
    bundle_option,
    check_json_path,
    check_report_dir,
    load_bundle,
    parse_tolerances,
    report_option,
    reporter,
    runner_options,
    tolerance_options,
    triton_options,
    verify_image_options,
    write_json,
)
from attunet_deploy.cli.render import stdout
from attunet_deploy.errors import InputError
from attunet_deploy.judge.results import Status


@main.command()
@bundle_option
@click.option("--backend", "backends", type=backend_choice(all_=True, auto=False), multiple=True,
              default=("all",), show_default=True, help="Backend(s) to verify (repeatable).")
@click.option("--precision", "precisions", type=click.Choice(PRECISION_CHOICES), multiple=True,
              default=("all",), show_default=True, help="Precision(s) to verify (repeatable).")
@verify_image_options
@click.option("--max-dice-drop", type=float, default=None, metavar="X",
              help="Fail a row whose Dice against the ground truth is more than X below the reference's.")
@click.option("--save-diff", default=None, metavar="DIR",
              help="Write a PNG per worst image of each row: agreement, reference-only and backend-only pixels.")
@triton_options
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write results as JSON ('-': stdout).")
@report_option
@tolerance_options
def verify(bundle_dir: str, backends: tuple[str, ...], precisions: tuple[str, ...], images: str | None,
           labels: str | None, max_dice_drop: float | None, save_diff: str | None, triton_url: str | None,
           triton_model: str | None, triton_timeout: float | None, json_path: str | None, report_dir: str | None,
           **tols: tuple[str, ...]) -> None:
    """Judge backends against the reference: the bundle's golden set, or --images (exit 1 on a miss).

    Passing runs on the golden set are recorded in the manifest; --images runs change nothing.
    """
    from attunet_deploy.errors import VerificationFailed
    from attunet_deploy.judge.report import verify_table
    from attunet_deploy.judge.verify import ImageSet, summary_counts, verify_images
    from attunet_deploy.judge.verify import verify as run_verify

    tolerances = parse_tolerances(**tols)
    check_json_path(json_path, bundle_dir)
    if labels is not None and images is None:
        raise InputError("--labels needs --images (the images the labels belong to)")
    check_report_dir(report_dir, bundle_dir, save_diff, json_path)
    bundle = load_bundle(bundle_dir)
    backend_list = ["all"] if "all" in backends else list(backends)
    precision_list = ["all"] if "all" in precisions else list(precisions)
    opts = runner_options(triton_url, triton_model, triton_timeout)
    if images is not None:
        rows = verify_images(bundle, ImageSet(images, labels), backend_list, precision_list, tolerances,
                             reporter=reporter(), max_dice_drop=max_dice_drop, save_diff=save_diff, **opts)
    else:
        rows = run_verify(bundle, backend_list, precision_list, tolerances, reporter=reporter(),
                          max_dice_drop=max_dice_drop, save_diff=save_diff, **opts)
    warnings: list[str] = []
    if images is None:  # the golden set: say when agreeing with its reference proves little
        from attunet_deploy.io.golden import load_golden
        from attunet_deploy.judge.degenerate import golden_warnings

        warnings = golden_warnings(bundle, load_golden(bundle))
        for w in warnings:
            reporter().notice("warning:", w)
    if json_path != "-":
        ref = rows[0].reference if rows else "reference"
        stdout().print(verify_table(rows, title=f"Verification against {ref}"))
        if save_diff is not None:
            from attunet_deploy.judge.diffimages import LEGEND

            stdout().print(f"Mask differences in {save_diff} ({LEGEND})", highlight=False)
    write_json(json_path, {"bundle": str(bundle.root), "images": images, "warnings": warnings,
                           "results": [r.to_dict() for r in rows]})
    if report_dir is not None:
        from attunet_deploy.judge.report_html import report_files, write_report_dir

        write_report_dir(report_dir, report_files(bundle, rows, [], extra=None if images is None else {
            "Images": f"Judged on {images}" + (f" with labels {labels}" if labels else "") + ", not the golden set."},
            warnings=warnings))
    counts = summary_counts(rows)
    if counts[Status.PASS] + counts[Status.FAIL] == 0:
        raise InputError("no requested backend can run here: " + "; ".join(
            f"{r.name}: {r.reason}" for r in rows)[:500])
    if counts[Status.FAIL]:
        failed = ", ".join(r.name for r in rows if r.status == Status.FAIL)
        raise VerificationFailed(f"{counts['fail']} backend(s) missed tolerance: {failed} (bundle not changed)")
    if images is None:
        from attunet_deploy.steps.record import record_verification

        why = record_verification(bundle, rows)
        if why is not None:
            reporter().notice("not recorded in the manifest:", why)
