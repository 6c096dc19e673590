"""``attdeploy demo-series``: a synthetic CT series to try ``predict --dicom-seg`` and ``serve-dicom``."""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main


@main.command("demo-series")
@click.option("-o", "--output", "out", required=True, metavar="DIR", help="New or empty folder for the series.")
@click.option("--slices", type=click.IntRange(2, 2000), default=40, show_default=True, help="Slices in the series.")
@click.option("--size", type=click.IntRange(32, 1024), default=512, show_default=True, help="Rows and columns.")
@click.option("--3d", "volume", is_flag=True, help="One phantom volume (for the 3D demo) instead of independent "
              "2D phantom slices (for the 2D demo).")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_series(out: str, slices: int, size: int, volume: bool, seed: int) -> None:
    """Write a synthetic axial CT series (DICOM CT Image Storage, dciodvfy-clean): 2.5 mm slices,
    a 40 cm field of view, one file per slice."""
    from pathlib import Path

    from attunet_deploy.demo.ctseries import SeriesGeometry, write_ct_series
    from attunet_deploy.errors import InputError
    from attunet_deploy.outputs import check_output

    target = check_output(out, "-o", kind="dir", empty=True)
    geometry = SeriesGeometry(spacing=2.5, pixel_spacing=400.0 / size)
    if volume:
        from attunet_deploy.demo.phantom3d import make_volume

        hu, labels = make_volume(seed, (slices, size, size))
        written = write_ct_series(target, geometry=geometry, volume=hu, labels=labels)
    else:
        written = write_ct_series(target, slices, (size, size), seed, geometry=geometry)
    if not written:
        raise InputError("no slices written")
    first, last = Path(written[0].path).name, Path(written[-1].path).name
    click.echo(f"wrote {len(written)} slices of {size}x{size} to {target} ({first} .. {last})")
    click.echo(f"  attdeploy predict -b {'deploy3d' if volume else 'deploy'} {target} --dicom-seg -o segs/")
    click.echo(f"  /usr/bin/storescu -aec ATTDEPLOY 127.0.0.1 11112 {target}/*.dcm   # to a running serve-dicom")
