"""PNG previews: raw, affinities and the segmentation overlaid, on a few sections.

A person checks a segmentation faster by eye than by numbers; the preview is written next to
every ``infer`` output.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ssn_deploy.volumes import Volume


def _colours(seg: np.ndarray) -> np.ndarray:
    """A random but stable colour per id (0 stays black)."""
    ids = seg.astype(np.uint64)
    mixed = (ids * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    rgb = np.stack([(mixed >> np.uint64(s)) & np.uint64(255) for s in (0, 8, 16)], axis=-1)
    rgb = rgb.astype(np.float32) / 255.0
    rgb[ids == 0] = 0.0
    return rgb


def write_preview(
    path: str | Path,
    raw: Volume,
    affinities: Volume | None,
    segmentation: Volume | None,
    *,
    sections: Sequence[int] | None = None,
    title: str = "",
) -> str | Path:
    """Write a grid of panels (rows: sections; columns: raw, affinities, overlay) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = raw.shape[0]
    sections = list(sections or sorted({depth // 4, depth // 2, (3 * depth) // 4}))
    columns = ["raw"] + (["affinities (z, y, x → RGB)"] if affinities is not None else [])
    columns += ["segmentation over raw"] if segmentation is not None else []
    fig, axes = plt.subplots(
        len(sections), len(columns), figsize=(4 * len(columns), 4 * len(sections)), squeeze=False
    )
    scale = float(
        (affinities.attrs.get("ssn_deploy", {}) if affinities is not None else {}).get(
            "scale", 255.0
        )
    )
    for row, z in enumerate(sections):
        image = raw[z : z + 1][0]
        panels = [(image, "gray")]
        if affinities is not None:
            aff = affinities[:, z : z + 1][:, 0].astype(np.float32) / scale
            panels.append((np.moveaxis(aff[:3], 0, -1).clip(0, 1), None))
        if segmentation is not None:
            seg = segmentation[z : z + 1][0]
            grey = image.astype(np.float32)[..., None] / 255.0
            panels.append((0.55 * _colours(seg) + 0.45 * grey, None))
        for col, (data, cmap) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(data, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col])
            if col == 0:
                ax.set_ylabel(f"z = {z}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if "://" in str(path) and not str(path).startswith("file://"):  # through fsspec
        from ssn_deploy.volumes import url_filesystem

        fs, inner = url_filesystem(str(path))
        with fs.open(inner, "wb") as f:
            fig.savefig(f, dpi=80, format="png")
        plt.close(fig)
        return path
    path = Path(str(path).removeprefix("file://"))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
