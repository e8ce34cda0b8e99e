"""``ironclaw image build|ls``: the root images VM backends boot (see docs/IMAGES.md)."""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ironclaw.cli.common import err_console, fail, new_app
from ironclaw.errors import IronclawError

__all__ = ["image_app", "register"]

image_app = new_app("VM root images: build, ls.")
_err = err_console

_QEMU_HINT = (
    "qemu-system-x86_64 is not installed, so the qemu backend cannot boot this image: "
    "apt-get install qemu-system-x86"
)


@image_app.command("build")
def image_build(
    name: Annotated[str, typer.Option("--name", help="Name to give the image.")] = "default",
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even when the recipe is cached.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Build (or find in the cache) the Debian root, kernel and initramfs; name it NAME."""
    from ironclaw.config import Settings
    from ironclaw.images import build_image

    settings = Settings.from_env()
    try:
        if as_json:
            art = asyncio.run(build_image(settings, name=name, force=force))
        else:
            with Progress(
                TextColumn("[bold]{task.description:<48}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                console=_err,
            ) as bar:
                task = bar.add_task("starting", total=1.0)

                def progress(step: str, frac: float) -> None:
                    bar.update(task, description=step, completed=frac)

                art = asyncio.run(build_image(settings, name=name, force=force, progress=progress))
    except IronclawError as exc:
        raise typer.Exit(fail(exc, as_json)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    qemu = shutil.which("qemu-system-x86_64") is not None
    if as_json:
        doc = {
            "name": art.name,
            "digest": art.digest,
            "kernel_release": art.kernel_release,
            "path": str(art.ext4.parent),
            "qemu": qemu,
        }
        print(json.dumps(doc))
        return
    _err.print(
        f"image [bold]{art.name}[/] = {art.digest} (kernel {art.kernel_release}) "
        f"in {art.ext4.parent}",
        highlight=False,
    )
    if not qemu:
        _err.print(f"[yellow]note:[/] {_QEMU_HINT}", highlight=False)


@image_app.command("ls")
def image_ls(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the named images that are complete on disk."""
    from ironclaw.config import Settings
    from ironclaw.images import list_images

    found = list_images(Settings.from_env())
    rows = []
    for art in found:
        size = sum(p.stat().st_size for p in (art.ext4, art.initramfs, art.vmlinux))
        rows.append(
            {
                "name": art.name,
                "digest": art.digest,
                "kernel_release": art.kernel_release,
                "size_mib": round(size / 2**20, 1),
                "path": str(art.ext4.parent),
            }
        )
    if as_json:
        print(json.dumps({"images": rows}))
        return
    if not rows:
        _err.print("no images yet: run `ironclaw image build`")
        return
    table = Table("NAME", "DIGEST", "KERNEL", "SIZE (MiB)")
    for row in rows:
        table.add_row(
            str(row["name"]), str(row["digest"]), str(row["kernel_release"]), str(row["size_mib"])
        )
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(image_app, name="image")
