"""The ``ssn-deploy`` command line: parse, validate, call one library function, report.

Library imports happen inside each command so that ``--help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from ssn_deploy import __version__
from ssn_deploy.cli_base import Group, agglomeration_option, quiet_dask, storage_options_option
from ssn_deploy.memory import trim_freed_memory_promptly

log = logging.getLogger("ssn_deploy")


def parse_triple(value: str | None, name: str) -> tuple[float, float, float] | None:
    """Parse ``"Z,Y,X"`` into three floats (voxel sizes, offsets, shapes)."""
    if value is None:
        return None
    try:
        numbers = tuple(float(p) for p in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 3:
        raise click.BadParameter(f"expected three numbers Z,Y,X, got {value!r}", param_hint=name)
    return numbers  # type: ignore[return-value]


def parse_voxel_size(value: str | None, name: str = "--voxel-size") -> tuple[float, ...] | None:
    """``"Z,Y,X"`` nm: three finite, positive numbers."""
    sizes = parse_triple(value, name)
    if sizes is not None and not all(0 < v < float("inf") for v in sizes):
        raise click.BadParameter(f"expected three positive sizes in nm, got {value}",
                                 param_hint=name)  # fmt: skip
    return sizes


def parse_roi(value: str) -> tuple[slice, slice, slice]:
    """``"Z0:Z1,Y0:Y1,X0:X1"`` → slices; open ends are allowed (``125:,:,:``)."""
    message = f"expected Z0:Z1,Y0:Y1,X0:X1 (voxels), got {value!r}"
    parts = value.split(",")
    if len(parts) != 3:
        raise click.BadParameter(message, param_hint="--roi")
    try:
        bounds = [[int(v) if v.strip() else None for v in part.split(":")] for part in parts]
        return tuple(slice(lo, hi) for lo, hi in bounds)  # type: ignore[return-value]
    except ValueError:
        raise click.BadParameter(message, param_hint="--roi") from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ssn-deploy")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Errors and results only (no progress bars).")
def main(verbose: int, quiet: bool) -> None:
    """Neuron segmentation of EM volumes: select, train, export, infer, serve, evaluate.

    Volumes are named as PATH for zarr/OME-Zarr/TIFF, or FILE:DATASET for HDF5 and N5
    (e.g. ``sample.hdf:volumes/raw``). Axes are z,y,x; voxel sizes are in nm.
    """
    level = logging.ERROR if quiet else logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trim_freed_memory_promptly()


# --- convert


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--chunks", help="Chunk shape Z,Y,X in voxels [default: ~2 MiB, isotropic in nm].")
@click.option("--voxel-size", help="Voxel size Z,Y,X in nm; overrides the stored one.")
@click.option(
    "--roi",
    help="Copy only this region of a 3D volume, in voxels: Z0:Z1,Y0:Y1,X0:X1 (e.g. 125:250,:,:).",
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@storage_options_option
def convert(
    src: str,
    dst: str,
    chunks: str | None,
    voxel_size: str | None,
    roi: str | None,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Copy the volume SRC into the OME-Zarr DST, chunk by chunk.

    \b
    SRC is one of:
      FILE.hdf:DATASET    HDF5 (.hdf/.h5/.hdf5), e.g. data.hdf:volumes/raw
      PATH.zarr[:NODE]    zarr v3/v2 array or OME-Zarr group (also memory://, s3:// URLs)
      PATH.n5:DATASET     N5
      STACK.tif           multi-page TIFF, or a directory of 2D TIFF sections
    DST is PATH.zarr (or PATH.zarr:NODE). Voxel size and offset are carried over. DST's
    directory must be writable and hold DST (SSN_DEPLOY_SPACE_CHECK=0 skips the space check);
    an interrupted copy is marked incomplete until it is run again with --overwrite.

    Example: ssn-deploy convert data.hdf:volumes/raw raw.zarr
    """
    from ssn_deploy.storage import storage_errors
    from ssn_deploy.volumes import convert as convert_volume

    then = "fix that and rerun with --overwrite (the copy so far is marked incomplete)"
    with storage_errors(dst, then):
        out = convert_volume(
            src,
            dst,
            chunks=parse_triple(chunks, "--chunks"),
            voxel_size=parse_voxel_size(voxel_size),
            roi=None if roi is None else parse_roi(roi),
            overwrite=overwrite,
            progress=not no_progress,
        )
    size = "x".join(f"{v:g}" for v in out.voxel_size or ())
    click.echo(
        f"wrote {dst}: shape {out.shape}, {out.dtype}, voxel size {size} nm, chunks {out.chunks}"
    )


# --- evaluate


def _evaluation_table(report: dict) -> str:
    """The human-readable form of an ``evaluate`` report."""
    ignored = ", ".join(str(i) for i in report["ignored_ids"])
    rows = [
        ("VOI split  H(seg|gt)", f"{report['voi_split']:.4f} bits"),
        ("VOI merge  H(gt|seg)", f"{report['voi_merge']:.4f} bits"),
        ("VOI total", f"{report['voi']:.4f} bits"),
        ("adapted Rand error", f"{report['arand']:.4f}"),
        ("  Rand precision", f"{report['rand_precision']:.4f}  (higher is better)"),
        ("  Rand recall", f"{report['rand_recall']:.4f}  (higher is better)"),
        ("CREMI score", f"{report['cremi_score']:.4f}"),
        ("split gt bodies", f"{report['n_split_bodies']} of {report['n_gt_bodies']}"),
        ("merged segments", f"{report['n_merged_segments']} of {report['n_seg_segments']}"),
        ("voxels evaluated", f"{report['n_voxels_evaluated']:,}"),
        ("voxels ignored", f"{report['n_voxels_ignored']:,} (gt ids {ignored})"),
    ]
    lines = [f"segmentation  {report['segmentation']}", f"ground truth  {report['ground_truth']}"]
    lines += [f"  {name:<22} {value}" for name, value in rows]
    lines.append(
        "Lower is better for VOI, ARAND and CREMI score; split/merge counts use majority"
        f" overlaps of >= {report['min_overlap']} voxels."
    )
    return "\n".join(lines)


@main.command()
@click.argument("seg")
@click.argument("gt")
@click.option(
    "--ignore-id",
    "ignore_ids",
    multiple=True,
    type=click.IntRange(0, 2**64 - 1),
    metavar="ID",
    help="Also ignore this ground-truth id (repeatable), e.g. a glia or catch-all body.",
)
@click.option(
    "--min-overlap",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Voxels a majority overlap needs to count towards split/merge counts.",
)
@click.option(
    "--voxel-size",
    default=None,
    help="Z,Y,X nm of both volumes, where their metadata lacks it or is wrong (e.g. an HDF5 "
    "without a resolution attribute beside an OME-Zarr); they must then agree.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--output", type=click.Path(dir_okay=False), help="Also write the JSON report to this file."
)
@click.option("--overwrite", is_flag=True, help="Replace the --output file if it exists.")
@storage_options_option
def evaluate(
    seg: str,
    gt: str,
    ignore_ids: tuple[int, ...],
    min_overlap: int,
    voxel_size: str | None,
    as_json: bool,
    output: str | None,
    overwrite: bool,
) -> None:
    """Compare the segmentation SEG with the ground truth GT (label volumes, z,y,x).

    \b
    SEG and GT are volume specs (x.zarr, f.hdf:volumes/labels/neuron_ids, ...) of equal
    shape, integer ids and, where both are known, equal voxel sizes. Lower is better for
    every error; logarithms are base 2 (bits).
      VOI split    H(SEG | GT): over-segmentation (gt bodies cut into several segments)
      VOI merge    H(GT | SEG): under-segmentation (segments spanning several gt bodies)
      VOI total    split + merge
      ARAND        adapted Rand error = 1 - F-score of Rand precision (pairs of voxels in
                   one segment that are in one gt body) and recall (pairs in one gt body
                   that are in one segment), as in skimage.metrics.adapted_rand_error
      CREMI score  sqrt(VOI total * ARAND)
      split / merged counts  gt bodies to which >= 2 segments are assigned, and segments to
                   which >= 2 gt bodies are assigned, each by its largest overlap of at
                   least --min-overlap voxels (diagnostics, not metrics)

    \b
    Zeros: GT voxels that are 0 (background/unknown), or carry an --ignore-id, are left out
    of every metric. A 0 in SEG is one ordinary segment, so unlabelled voxels count as one
    big merge: an all-zero prediction scores badly, never well.

    \b
    Example:
      ssn-deploy evaluate seg.zarr gt.hdf:volumes/labels/neuron_ids --ignore-id 135478
    """
    from ssn_deploy.errors import OutputExistsError
    from ssn_deploy.metrics import evaluate as evaluate_volumes
    from ssn_deploy.storage import check_writable
    from ssn_deploy.volumes import open_volume, refuse_overlap

    if output is not None:
        refuse_overlap(output, [seg, gt], "--output")
        if Path(output).exists() and not overwrite:
            raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
        check_writable(output)
    vs = parse_voxel_size(voxel_size)
    with open_volume(seg, voxel_size=vs) as seg_vol, open_volume(gt, voxel_size=vs) as gt_vol:
        scores = evaluate_volumes(seg_vol, gt_vol, ignore_ids=ignore_ids, min_overlap=min_overlap)
    report = {"segmentation": seg, "ground_truth": gt, "version": __version__, **scores}
    if vs is not None:
        report["voxel_size"] = list(vs)
    text = json.dumps(report, indent=2)
    if output is not None:
        Path(output).write_text(text + "\n")
    click.echo(text if as_json else _evaluation_table(report))


# --- train


def _print_config_keys(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from ssn_deploy.training.schema import config_reference

    click.echo(config_reference())
    ctx.exit()


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    "run_dir",
    default="runs/train",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Run directory (checkpoints, logs).",
)
@click.option("--iterations", type=click.IntRange(min=1), help="Override training.iterations.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Override training.device.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Override training.lr.")
@click.option("--resume", is_flag=True, help="Continue RUN_DIR from its last.ckpt.")
@click.option("--overwrite", is_flag=True, help="Delete an existing RUN_DIR first.")
@click.option(
    "--time-budget",
    "time_budget",
    type=click.FloatRange(min=0, min_open=True),
    metavar="MINUTES",
    help="Fit the schedule to this wall-clock time: after 50 timed updates, training."
    "iterations (and lr_decay_start in proportion) are set so the run ends in time; "
    "RUN_DIR/config.yaml records them.",
)
@click.option(
    "--config-keys",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_print_config_keys,
    help="Print every config key with its default and meaning, and exit.",
)
def train(config: str, run_dir: str, iterations: int | None, device: str | None,
          lr: float | None, resume: bool, overwrite: bool,
          time_budget: float | None) -> None:  # fmt: skip
    """Train an affinity model from CONFIG.yaml: supervised, or semi-supervised (IIC, mean
    teacher) when the config has a semi: section.

    Validation runs every training.val_every iterations on data.val_z: its VOI (split/merge)
    and ARAND at the best of validation.thresholds are printed, and RUN_DIR/best.ckpt follows
    the best (a line says when it changes). Examples are in configs/; --config-keys lists
    every key.
    """
    import functools

    from ssn_deploy.agglomeration import segment_affinities
    from ssn_deploy.storage import check_writable
    from ssn_deploy.training import load_config
    from ssn_deploy.training import train as run_training

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    if resume and time_budget:
        raise click.UsageError(
            "--time-budget sets a new run's schedule; resume with RUN_DIR/config.yaml, "
            "which records it"
        )
    cfg = load_config(config)
    if overwrite:
        from ssn_deploy.volumes import refuse_overlap

        refuse_overlap(run_dir, [config], "run directory")
    check_writable(run_dir, replace=overwrite)
    segmenter = functools.partial(
        segment_affinities,
        threshold=list(cfg.validation.thresholds),
        offsets=cfg.model.offsets,
        anisotropic=not cfg.data.isotropic,
    )
    best = run_training(cfg, run_dir, iterations=iterations, device=device, lr=lr,
                        resume=resume, overwrite=overwrite, segmenter=segmenter,
                        time_budget_s=time_budget * 60 if time_budget else None)  # fmt: skip
    click.echo(str(best))


# --- pretrain


@main.command()
@click.argument("volumes", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "run_dir",
    default="runs/pretrain",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Run directory: encoder.ckpt (weights only), last.ckpt (resumable), log.csv.",
)
@click.option("--iterations", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option(
    "--crop",
    default=None,
    help="Z,Y,X crop (the patch the encoder learns) [default: the paper's field of view, "
    "640 nm in-plane (160 px at 4 nm, 64 px at 10 nm) by 18 sections, or a cube for "
    "isotropic data].",
)
@click.option("--batch-size", type=click.IntRange(min=2), default=2, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--resume", is_flag=True, help="Continue RUN_DIR from its last.ckpt.")
@click.option("--overwrite", is_flag=True, help="Delete an existing RUN_DIR first.")
@storage_options_option
def pretrain(volumes: tuple[str, ...], run_dir: str, iterations: int, crop: str | None,
             batch_size: int, lr: float, seed: int, threads: int | None, checkpoint_every: int,
             resume: bool, overwrite: bool) -> None:  # fmt: skip
    """Self-supervised (SimSiam) training of the U-Net encoder on unlabelled VOLUMES.

    The encoder embeds patches for `ssn-deploy select`. Two views of each random crop, one
    random EM perturbation each (intensity, noise, blur, cutout, misalignment, elastic,
    flips); symmetric stop-gradient cosine loss; Adam, lr poly-decayed to 1e-4 (power 1.5).
    The architecture (filters 16..64, 4 poolings) follows the voxel size: (1,2,2) poolings
    and 1x5x5 embedding convs for serial sections, (2,2,2) and 5x5x5 for isotropic data.
    """
    from ssn_deploy.geometry import anisotropy
    from ssn_deploy.models.unet import ModelConfig
    from ssn_deploy.storage import check_writable
    from ssn_deploy.training.simsiam import PretrainConfig, default_crop
    from ssn_deploy.training.simsiam import pretrain as run_pretrain
    from ssn_deploy.volumes import open_volume

    check_writable(run_dir, replace=overwrite)

    with open_volume(volumes[0]) as first:
        voxel_size = first.voxel_size
    isotropic = voxel_size is not None and anisotropy(voxel_size) < 2
    pool = (2, 2, 2) if isotropic else (1, 2, 2)
    model = ModelConfig(
        filters=(16, 24, 32, 48, 64),
        poolings=(pool,) * 4,
        embed_kernel=(5, 5, 5) if isotropic else (1, 5, 5),
    )
    shape = _int_triple(crop, "--crop") or default_crop(voxel_size, isotropic)
    config = PretrainConfig(
        crop=shape,
        iterations=iterations,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        threads=threads,
        checkpoint_every=checkpoint_every,
        isotropic=isotropic,
        model=model,
    )
    encoder = run_pretrain(list(volumes), run_dir, config, resume=resume, overwrite=overwrite)
    click.echo(str(encoder))


# --- select


@main.command()
@click.argument("volume")
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder: embeddings.zarr, rois.json, roi_N crops, selection.png.",
)
@click.option(
    "--encoder",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="encoder.ckpt from ssn-deploy pretrain (same voxel size as VOLUME) [default: the "
    "packaged encoder for VOLUME's voxel size, pretrained on the bundled CC BY FIB-SEM volumes].",
)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Number of sub-volumes to annotate.",
)
@click.option(
    "--window",
    default=None,
    help="Z,Y,X voxels of one sub-volume [default: 1x9x9 patches for serial sections "
    "(18x480x480 voxels with the paper's patch), 3x3x3 for isotropic data; shrunk, "
    "with a warning, when --budget of them do not fit].",
)
@click.option(
    "--k",
    "k",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Each patch covers its k nearest neighbours in embedding space.",
)
@click.option(
    "--stride",
    default=None,
    help="Z,Y,X patch stride [default: 1/4 of the patch (~0.45 in z for serial sections), "
    "rounded to the encoder's granularity].",
)
@click.option(
    "--method",
    type=click.Choice(["dense", "patch"]),
    default="dense",
    show_default=True,
    help="dense: encode the volume once, blockwise, and average the feature map over each "
    "patch (many times faster); patch: encode every patch on its own (the paper's way).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Dask worker threads for dense embedding (torch threads are shared).",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="Z0:Z1,Y0:Y1,X0:X1",
    help="Keep this region (voxels) out of selection and coverage, e.g. a test region.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the baselines.")
@click.option(
    "--crop-format", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True
)
@click.option("--overwrite", is_flag=True, help="Replace an existing selection (and embeddings).")
@click.option("--no-progress", is_flag=True)
@storage_options_option
def select(volume: str, out_dir: str, encoder: str | None, budget: int, window: str | None,
           k: int, stride: str | None, method: str, workers: int, exclude: tuple[str, ...],
           seed: int, crop_format: str, overwrite: bool, no_progress: bool) -> None:  # fmt: skip
    """Choose which sub-volumes of VOLUME to annotate (coverage-based greedy selection, CGS).

    Every patch of VOLUME is embedded by the pretrained encoder (stored, and reused when
    selecting again with the same encoder and stride); each patch covers its k nearest
    neighbours; --budget windows of adjacent patches are picked greedily, each adding the
    most uncovered patches, no two sharing a voxel. rois.json also reports the coverage that
    5 random selections and k-means++ reach at the same budget.
    """
    from ssn_deploy.geometry import Box
    from ssn_deploy.selection.select import select_volume
    from ssn_deploy.storage import check_writable
    from ssn_deploy.volumes import open_volume

    check_writable(out_dir)

    with open_volume(volume) as raw:
        shape = raw.shape
    boxes = []
    for text in exclude:
        slices = parse_roi(text)
        boxes.append(Box.from_bounds(
            [s.start or 0 for s in slices],
            [s.stop if s.stop is not None else n for s, n in zip(slices, shape, strict=True)],
        ))  # fmt: skip
    report = select_volume(
        volume, encoder, out_dir, budget=budget, window_voxels=_int_triple(window, "--window"),
        k=k, stride=_int_triple(stride, "--stride"), method=method, workers=workers,
        exclude=boxes, seed=seed,
        crop_format=crop_format, overwrite=overwrite, progress=not no_progress,
        announce=lambda message: click.echo(message, err=True),
    )  # fmt: skip
    for roi in report["rois"]:
        click.echo(f"ROI {roi['index']}: offset {roi['offset_voxels']} shape {roi['shape_voxels']}"
                   f" (coverage {roi['coverage']:.3f})")  # fmt: skip
    c = report["coverage"]
    click.echo(f"coverage: CGS {c['cgs']:.3f}, best of {len(c['random'])} random "
               f"{c['random_best']:.3f}, k-means++ {c['kmeans++']:.3f}")  # fmt: skip
    click.echo(f"wrote {out_dir}/rois.json, crops and {out_dir}/selection.png")


# --- infer / segment


def default_output(volume: str) -> str:
    """``VOLUME`` stem + ``.ssn.zarr`` beside it (``data.hdf:volumes/raw`` → ``data.ssn.zarr``,
    ``s3://b/raw.zarr`` → ``s3://b/raw.ssn.zarr``); in the working directory for a read-only
    ``http(s)://`` volume."""
    from ssn_deploy.storage import READ_ONLY_SCHEMES
    from ssn_deploy.volumes import container_of

    stem = container_of(volume).removesuffix("/")
    stem = stem[: -len(Path(stem).suffix) or None]
    if volume.lower().startswith(READ_ONLY_SCHEMES):
        stem = stem.rsplit("/", 1)[-1]
    return stem + ".ssn.zarr"


def _int_triple(value: str | None, name: str) -> tuple[int, int, int] | None:
    numbers = parse_triple(value, name)
    if numbers is None:
        return None
    if any(n != int(n) or n < 1 for n in numbers):
        raise click.BadParameter(
            f"expected three positive integers, got {value!r}", param_hint=name
        )
    return tuple(int(n) for n in numbers)  # type: ignore[return-value]


RESUME_AFTER_STORAGE_ERROR = "fix that and rerun with --resume (finished blocks are kept)"


@main.command()
@click.argument("volume")
@click.option(
    "-o",
    "--output",
    default=None,
    help="Output group OUT.zarr [default: VOLUME stem + .ssn.zarr, beside VOLUME; in the working "
    "directory for an http(s):// VOLUME].",
)
@click.option(
    "--model",
    default="default",
    show_default=True,
    help="'default' (the packaged model whose voxel size fits the volume: 'iso' for isotropic "
    "FIB-SEM, 'aniso' for serial sections), 'iso', 'aniso', FILE.ckpt (torch), FILE.onnx "
    "(onnxruntime), FILE.plan "
    "(TensorRT engine from ssn-deploy export --format tensorrt), or 'intensity' "
    "(no-network baseline: raw intensity as affinities).",
)
@click.option(
    "--backend",
    type=click.Choice(["torch", "onnxruntime", "tensorrt", "triton"]),
    default=None,
    help="Defaults to the fastest that runs --model: the file's own (.ckpt torch, .onnx "
    "onnxruntime, .plan tensorrt); for packaged models torch bf16 on CPUs with native bf16, "
    "else onnxruntime (torch with --precision bf16/fp16 or --compile); triton with --url.",
)
@click.option(
    "--url",
    default=None,
    help="HOST:PORT of a Triton server (ssn-deploy serve start) that runs the model: patches "
    "are sent there (--backend triton); model and geometry are the served model's.",
)
@click.option(
    "--protocol",
    type=click.Choice(["grpc", "http"]),
    default="grpc",
    show_default=True,
    help="How to talk to --url (gRPC: port 8001 by default, HTTP: 8000).",
)
@click.option(
    "--triton-model",
    default="affinity_py",
    show_default=True,
    help="The served model (affinity_onnx on Triton GPU images).",
)
@click.option(
    "--triton-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    help="Seconds one request to --url may take.",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="torch precision. auto: bf16 for the packaged models on a CPU with native bf16 "
    "(AVX512-BF16/AMX; ~2x onnxruntime fp32 at the same segmentation), else fp32.",
)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model (torch).")
@click.option(
    "--tta",
    type=click.Choice(["none", "yx", "zyx"]),
    default="none",
    show_default=True,
    help="Test-time augmentation: average the model over flips of these axes (4 or 8 model "
    "calls per patch; see the README for what it buys).",
)
@click.option(
    "--threads",
    type=int,
    default=None,
    help="Intra-op threads of torch / onnxruntime [default: cores / workers].",
)
@click.option(
    "--batch-size", type=int, default=1, show_default=True, help="Patches per model call."
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Agglomeration stops at this score (1 - median boundary affinity) "
    "[default: the model's, chosen on its validation data, else 0.5].",
)
@click.option(
    "--block-shape",
    default=None,
    help="Z,Y,X voxels per block, a multiple of the fragment tile [default: from the voxel size].",
)
@click.option(
    "--fragment-tile",
    default=None,
    help="Z,Y,X fragment tile: the segmentation depends on it, never on the blocks "
    "[default: half a default block].",
)
@click.option(
    "--patch-shape", default=None, help="Z,Y,X model input per patch [default: from the model]."
)
@click.option(
    "--scheduler",
    default=None,
    help="dask.distributed scheduler address (tcp://host:port) [default: in-process].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker threads of the in-process cluster.",
)
@click.option("--voxel-size", default=None, help="Z,Y,X nm, if the volume does not say.")
@click.option(
    "--affinity-dtype",
    type=click.Choice(["uint8", "float16", "float32"]),
    default="uint8",
    show_default=True,
    help="How affinities are stored (uint8 = x255).",
)
@agglomeration_option("auto")
@click.option("--resume", is_flag=True, help="Continue a killed run; finished blocks are skipped.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--no-preview", is_flag=True, help="Do not write the PNG preview.")
@click.option(
    "--json", "as_json", is_flag=True, help="Paths, geometry and timings as JSON on stdout."
)
@storage_options_option
@click.pass_context
def infer(
    ctx: click.Context,
    volume: str,
    output: str | None,
    model: str,
    backend: str | None,
    url: str | None,
    protocol: str,
    triton_model: str,
    triton_timeout: float,
    device: str,
    precision: str,
    compile_model: bool,
    tta: str,
    threads: int | None,
    batch_size: int,
    threshold: float | None,
    block_shape: str | None,
    patch_shape: str | None,
    fragment_tile: str | None,
    scheduler: str | None,
    workers: int,
    voxel_size: str | None,
    affinity_dtype: str,
    agglomeration: str | None,
    resume: bool,
    overwrite: bool,
    no_progress: bool,
    no_preview: bool,
    as_json: bool,
) -> None:
    """Segment neurons in VOLUME (uint8 raw, z,y,x): affinities, fragments, segmentation.

    Writes OUT.zarr with arrays affinities (C,Z,Y,X uint8 x255), fragments and segmentation
    (uint64, 0 = none), each with provenance attributes, plus OUT.preview.png. Blocks are
    processed by dask (in-process by default, --scheduler for a cluster) and recorded when
    done, so --resume continues a killed run (or one stopped by a full disk). Before any
    block, OUT's directory must be writable and have room for OUT (SSN_DEPLOY_SPACE_CHECK=0
    skips the space check) and, with --scheduler, every worker must see VOLUME and OUT's
    directory by the same absolute paths.

    Example: ssn-deploy sample demo && ssn-deploy infer demo/raw.zarr -o demo/seg.zarr

    With a Triton server: ssn-deploy infer demo/raw.zarr --backend triton --url 127.0.0.1:8001
    """
    from ssn_deploy.pipeline import infer as run_infer
    from ssn_deploy.storage import storage_errors

    quiet_dask(ctx)
    out = output or default_output(volume)
    with storage_errors(out, RESUME_AFTER_STORAGE_ERROR):
        result = run_infer(
            volume,
            out,
            model=model,
            backend=backend or "auto",
            device=device,
            precision=precision,
            compile=compile_model,
            tta=None if tta == "none" else tta,
            threads=threads,
            batch_size=batch_size,
            threshold=threshold,
            block_shape=_int_triple(block_shape, "--block-shape"),
            patch_shape=_int_triple(patch_shape, "--patch-shape"),
            fragment_tile=_int_triple(fragment_tile, "--fragment-tile"),
            scheduler=scheduler,
            workers=workers,
            voxel_size=parse_voxel_size(voxel_size),
            affinity_dtype=affinity_dtype,
            agglomeration=agglomeration or "auto",
            resume=resume,
            overwrite=overwrite,
            progress=not no_progress,
            preview=not no_preview,
            announce=lambda message: click.echo(message, err=True),
            url=url,
            protocol=protocol,
            triton_model=triton_model,
            triton_timeout=triton_timeout,
        )
    seconds = sum(result["timings"].values())
    rate = result["voxels"] / seconds / 1e6
    if as_json:  # for pipelines: paths, geometry, timings, one object on stdout
        click.echo(json.dumps(result | {"seconds": seconds, "mvox_per_s": rate}, default=str))
        return
    click.echo(f"segmentation: {result['segmentation']}")
    click.echo(f"affinities:   {result['affinities']}")
    if "preview" in result:
        click.echo(f"preview:      {result['preview']}")
    click.echo(f"{result['voxels']:,} voxels in {seconds:.1f} s ({rate:.2f} MVox/s)")


@main.command()
@click.argument("affinities")
@click.option(
    "-o", "--output", required=True, help="Output group OUT.zarr (fragments, segmentation)."
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Agglomeration stops at this score (1 - median boundary affinity) "
    "[default: the one infer used for AFFINITIES, else 0.5].",
)
@click.option(
    "--block-shape",
    default=None,
    help="Z,Y,X voxels per block, a multiple of --fragment-tile [default: infer's, else "
    "from the voxel size].",
)
@click.option(
    "--fragment-tile",
    "--tile",
    "tile",
    default=None,
    help="Z,Y,X fragment tile; results depend on it, not on blocks [default: infer's, else "
    "half a block].",
)
@click.option(
    "--anisotropic/--isotropic",
    default=None,
    help="2D fragments per section (serial-section EM) or 3D [default: infer's, else from the "
    "voxel size: z >= 2x the pixel size is anisotropic].",
)
@agglomeration_option("the one infer used for AFFINITIES, else auto")
@click.option("--scheduler", default=None, help="dask.distributed scheduler address.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--resume", is_flag=True, help="Continue a killed run.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--no-progress", is_flag=True)
@storage_options_option
@click.pass_context
def segment(
    ctx: click.Context,
    affinities: str,
    output: str,
    threshold: float | None,
    block_shape: str | None,
    tile: str | None,
    anisotropic: bool | None,
    agglomeration: str | None,
    scheduler: str | None,
    workers: int,
    resume: bool,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Agglomerate AFFINITIES (C,Z,Y,X zarr written by infer) into a segmentation.

    Fragments (seeded watershed per tile) are merged by median boundary affinity
    (waterz aff50_his256) until --threshold, over one global region graph. Settings not given
    are those infer recorded in the affinities' provenance, so a rerun repeats infer's
    segmentation exactly; the settings used are printed.
    """
    from ssn_deploy.agglomeration.blockwise import (
        affinity_offsets,
        check_threshold,
        refuse_overwriting_input,
        segment_blockwise,
    )
    from ssn_deploy.outputs import stage_specs
    from ssn_deploy.pipeline import check_storage, segmentation_settings
    from ssn_deploy.storage import absolute_spec, storage_errors
    from ssn_deploy.volumes import open_volume

    quiet_dask(ctx)
    if scheduler is not None:  # workers open the volumes by these names
        affinities, output = absolute_spec(affinities), absolute_spec(output)
    affs = open_volume(affinities)
    specs = stage_specs(output)  # labels/fragments, labels/segmentation
    refuse_overwriting_input(affs.spec, specs["fragments"], specs["segmentation"])
    check_storage(output, scheduler, [affinities], resume)
    affinity_offsets(affs, None)
    if threshold is not None:
        check_threshold(threshold)
    settings = segmentation_settings(
        affs,
        threshold=threshold,
        block_shape=_int_triple(block_shape, "--block-shape"),
        fragment_tile=_int_triple(tile, "--fragment-tile"),
        anisotropic=anisotropic,
        agglomeration=agglomeration,
    )
    click.echo(
        "settings: threshold {threshold}, {kind} fragments, blocks {block_shape}, "
        "fragment tile {fragment_tile}, {agglomeration} agglomeration ({origin})".format(
            kind="2D (per section)" if settings["anisotropic"] else "3D", **settings
        )
    )
    with storage_errors(output, RESUME_AFTER_STORAGE_ERROR):
        seg, history = segment_blockwise(
            affs,
            specs["fragments"],
            specs["segmentation"],
            threshold=settings["threshold"],
            block_shape=settings["block_shape"],
            fragment_tile=settings["fragment_tile"],
            anisotropic=settings["anisotropic"],
            scheduler=scheduler,
            workers=workers,
            resume=resume,
            overwrite=overwrite,
            progress=not no_progress,
            superblocks=settings["agglomeration"] == "superblocks",
        )
    counts = (
        f"{len(history.fragments):,} fragments, {len(history.score):,} merges"
        if history is not None
        else "merged by super-blocks"
    )
    click.echo(f"segmentation: {seg.spec} ({counts})")


# --- export


class _CheckpointOrPackaged(click.Path):
    """A checkpoint file, or the name of a packaged model (iso, aniso; default means iso)."""

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        from ssn_deploy.inference.loader import is_packaged_name

        if isinstance(value, str) and is_packaged_name(value):
            return value
        return super().convert(value, param, ctx)


@main.command()
@click.argument(
    "checkpoint",
    required=False,
    default="iso",
    type=_CheckpointOrPackaged(exists=True, dir_okay=False),
)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Directory.")
@click.option(
    "--format",
    "formats",
    type=click.Choice(["onnx", "tensorrt", "bioimageio"]),
    multiple=True,
    default=("onnx",),
    show_default=True,
    help="Artefacts to build; tensorrt (needs a GPU and the tensorrt package) implies onnx; "
    "bioimageio (model.bioimageio.zip, a bioimage.io model package; needs the bioimageio "
    "extra) implies onnx.",
)
@click.option(
    "--fp16", is_flag=True, help="Also write model.fp16.onnx; TensorRT engines are built in fp16."
)
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option(
    "--simplify/--no-simplify",
    default=True,
    show_default=True,
    help="Fold constants and BatchNorm into the convolutions (onnxscript optimizer).",
)
@click.option(
    "--patch-shape",
    default=None,
    help="Z,Y,X largest patch a TensorRT engine accepts [default: infer's patch for this model].",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Largest batch a TensorRT engine accepts (infer --batch-size).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where onnxruntime runs the parity check.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing files in the directory.")
def export(
    checkpoint: str,
    output: str,
    formats: tuple[str, ...],
    fp16: bool,
    opset: int,
    simplify: bool,
    patch_shape: str | None,
    max_batch: int,
    device: str,
    overwrite: bool,
) -> None:
    """Export CHECKPOINT for deployment into OUTPUT, with a parity report.

    CHECKPOINT is a .ckpt file or a packaged model: iso (the default) or aniso. Writes
    model.ckpt (weights only: no optimizer or RNG state), model.onnx (dynamic batch and z/y/x
    axes; offsets, normalisation, voxel size, context, granularity and threshold in its
    metadata, so `ssn-deploy infer --model model.onnx` needs nothing else), model.fp16.onnx
    with --fp16, and with --format tensorrt an engine under tensorrt/<sm_XY>/ (built for this
    GPU, cached by ONNX hash, profile and precision). With --format bioimageio,
    model.bioimageio.zip packages the ONNX graph and the state dict for bioimage.io (format 0.5:
    uint8 input with the model's normalisation, affinities out, voxel size in nm, offsets and
    decoder threshold in config.ssn_deploy, test tensors from the bundled sample predicted by
    onnxruntime, the model card as documentation).

    parity.json runs every artefact on a real EM block of the bundled sample, as infer would,
    and compares it with torch fp32: max |affinity difference| (tolerance 1e-4, fp16 1e-2) and
    the difference of the segmentations' VOI against the ground truth (tolerance 0.01); the
    VOI between the two segmentations is reported too. Exits with status 1 if an artefact is
    out of tolerance.
    """
    from ssn_deploy.inference.loader import default_model, is_packaged_name
    from ssn_deploy.parity import export_with_parity
    from ssn_deploy.storage import check_writable

    if is_packaged_name(checkpoint):
        checkpoint = str(default_model("torch", "iso" if checkpoint == "default" else checkpoint))
    check_writable(output)
    result = export_with_parity(
        checkpoint,
        output,
        tensorrt="tensorrt" in formats,
        bioimageio="bioimageio" in formats,
        fp16=fp16,
        opset=opset,
        simplify=simplify,
        patch_shape=_int_triple(patch_shape, "--patch-shape"),
        max_batch=max_batch,
        device=device,
        overwrite=overwrite,
    )
    for path in result["files"].values():
        click.echo(f"wrote {path}")
    report = result["parity"]
    click.echo(f"parity on {report['shape']} (reference: torch fp32):")
    for name, row in report["variants"].items():
        if "not_run" in row:
            click.echo(f"  {name}: not run ({row['not_run']})")
            continue
        click.echo(
            f"  {name}: max |diff| {row['max_abs_diff']:.2e}, VOI to ground truth "
            f"{row['to_ground_truth']['voi']:.4f} (torch "
            f"{report['reference']['to_ground_truth']['voi']:.4f}), VOI between the "
            f"segmentations {row['segmentation_vs_reference']['voi']:.4f}: "
            f"{'ok' if row['ok'] else 'FAILED'}"
        )


# --- verify


@main.command("export-precomputed")
@click.argument("volume")
@click.argument("destination")
@click.option(
    "--layer-type",
    type=click.Choice(["auto", "image", "segmentation"]),
    default="auto",
    show_default=True,
    help="auto: segmentation for integer ids wider than a byte, else image.",
)
@click.option("--overwrite", is_flag=True, help="Replace a precomputed volume at DESTINATION.")
@storage_options_option
def export_precomputed_command(volume: str, destination: str, layer_type: str,
                               overwrite: bool) -> None:  # fmt: skip
    """Copy VOLUME to Neuroglancer precomputed at DESTINATION, for tools that read that format.

    VOLUME is any volume, typically OUT.zarr/segmentation; DESTINATION a folder or a gs:// or
    s3:// URL. Segmentations use compressed_segmentation encoding, images raw."""
    from ssn_deploy.precomputed import export_precomputed
    from ssn_deploy.storage import check_writable
    from ssn_deploy.volumes import refuse_overlap

    refuse_overlap(destination, [volume])
    check_writable(destination, replace=overwrite)
    info = export_precomputed(volume, destination, layer_type=layer_type, overwrite=overwrite)
    click.echo(f"wrote {info['type']} {info['size']} (x,y,z) at {info['resolution']} nm "
               f"to {destination}")  # fmt: skip


@main.command()
@click.argument("output")
@click.argument("raw", required=False)
@click.option(
    "--bind",
    default="127.0.0.1",
    show_default=True,
    help="Address to serve on (0.0.0.0 exposes the data to the network).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="Port [default: a free one].")  # fmt: skip
@storage_options_option
def view(output: str, raw: str | None, bind: str, port: int) -> None:
    """Browse OUTPUT (an infer output, OUT.zarr) in neuroglancer: raw (RAW, else the volume
    infer recorded), affinities, segmentation and fragments at the right voxel size. Prints
    the URL to open and serves until Ctrl-C. Needs `pip install 'ssn-deploy[view]'`."""
    import time

    from ssn_deploy.view import open_viewer

    viewer = open_viewer(output, raw, bind=bind, port=port)
    click.echo(f"neuroglancer: {viewer}")
    click.echo("serving until Ctrl-C", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("output")
@click.option("--dry-run", is_flag=True, help="Only report; leave the markers as they are.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
@storage_options_option
def verify(output: str, dry_run: bool, as_json: bool) -> None:
    """Check every finished block of OUTPUT (an infer or segment output, OUT.zarr) against the
    checksum it was marked with, and unmark damaged blocks so that `--resume` recomputes only
    those. Exit status 1 when damage was found.
    """
    from ssn_deploy.verify import verify_output

    report = verify_output(output, repair=not dry_run)
    damaged = 0
    if as_json:
        click.echo(json.dumps(report, default=str))
    for stage, r in report.items():
        damaged += len(r["damaged"])
        if as_json:
            continue
        note = "" if r["checked"] else " (written before checksums: not checked)"
        click.echo(f"{stage}: {r['finished']}/{r['blocks']} blocks finished, "
                   f"{len(r['damaged'])} damaged {r['damaged'][:20]}{note}")  # fmt: skip
    if damaged:
        action = "reported" if dry_run else "unmarked: rerun the same command with --resume"
        click.echo(f"error: {damaged} damaged block(s) {action}", err=True)
        sys.exit(1)


# --- sample


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace raw.zarr/labels.zarr if they exist.")
def sample(directory: str, overwrite: bool) -> None:
    """Write the bundled demo volume into DIRECTORY as raw.zarr and labels.zarr (OME-Zarr).

    A 80x160x160 crop (10 nm isotropic FIB-SEM, Drosophila medulla) of the test region of
    fib_medulla_250, with dense neuron labels. FlyEM / HHMI Janelia, CC BY 3.0.
    """
    from ssn_deploy.sample import ATTRIBUTION, write_sample
    from ssn_deploy.storage import check_writable

    check_writable(directory)
    written = write_sample(directory, overwrite=overwrite)
    for name, vol in written.items():
        click.echo(f"{name}: {vol.spec} shape={vol.shape} dtype={vol.dtype}")
    click.echo(f"source: {ATTRIBUTION}")


from ssn_deploy.cli_serve import serve  # noqa: E402

main.add_command(serve)


if __name__ == "__main__":  # pragma: no cover
    main()
