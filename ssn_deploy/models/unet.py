"""The residual symmetric 3D U-Net of Lee et al. 2017 ("superhuman"), with "same" padding.

"Same" padding keeps output shape == input shape, which is what the blockwise engine and the
training losses want; the price is that voxels within :attr:`ModelConfig.context` of a block
border see zero padding, so the engine crops that margin (see ``UNet3d.context``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ssn_deploy.errors import ConfigError, InvalidInputError

Triple = tuple[int, int, int]

NORMS = ("batch", "group", "none")
SKIPS = ("concat", "add")


def _triple(value: Any, key: str) -> Triple:
    try:
        items = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"model.{key}: expected three integers z,y,x, got {value!r}") from None
    if len(items) != 3:
        raise ConfigError(f"model.{key}: expected three integers z,y,x, got {value!r}")
    return items  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of :class:`UNet3d`; stored in checkpoints and ONNX metadata."""

    filters: tuple[int, ...] = (28, 36, 48, 64, 80)
    poolings: tuple[Triple, ...] = ((1, 2, 2),) * 4
    offsets: tuple[Triple, ...] = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
    in_channels: int = 1
    embed_kernel: Triple = (1, 5, 5)
    skip: str = "concat"
    norm: str = "batch"
    name: str = field(default="unet3d")

    def __post_init__(self) -> None:
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))
        poolings = tuple(_triple(p, f"poolings[{i}]") for i, p in enumerate(self.poolings))
        object.__setattr__(self, "poolings", poolings)
        offsets = tuple(_triple(o, f"offsets[{i}]") for i, o in enumerate(self.offsets))
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "embed_kernel", _triple(self.embed_kernel, "embed_kernel"))
        if len(self.filters) < 1 or any(f < 1 for f in self.filters):
            raise ConfigError(f"model.filters: expected positive integers, got {self.filters}")
        if len(self.poolings) != len(self.filters) - 1:
            raise ConfigError(
                f"model.poolings: expected {len(self.filters) - 1} factors (one per level "
                f"below the top of {len(self.filters)} filters), got {len(self.poolings)}"
            )
        if any(p < 1 for pool in self.poolings for p in pool):
            raise ConfigError(f"model.poolings: factors must be >= 1, got {self.poolings}")
        if not self.offsets:
            raise ConfigError("model.offsets: at least one affinity offset is required")
        if any(k < 1 or k % 2 == 0 for k in self.embed_kernel):
            raise ConfigError(f"model.embed_kernel: odd sizes required, got {self.embed_kernel}")
        if self.skip not in SKIPS:
            raise ConfigError(f"model.skip: expected one of {SKIPS}, got {self.skip!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"model.norm: expected one of {NORMS}, got {self.norm!r}")
        if self.in_channels < 1:
            raise ConfigError(f"model.in_channels: must be >= 1, got {self.in_channels}")

    @property
    def out_channels(self) -> int:
        return len(self.offsets)

    @property
    def granularity(self) -> Triple:
        """Input z/y/x sizes must be multiples of this (product of the poolings per axis)."""
        g = [1, 1, 1]
        for pool in self.poolings:
            g = [a * b for a, b in zip(g, pool, strict=True)]
        return tuple(g)  # type: ignore[return-value]

    @property
    def context(self) -> Triple:
        """Voxels each side an output voxel depends on (a conservative bound, per axis).

        Walk the U from the bottom: a level's one-sided extent E (in its own voxels) is
        ``r_down + p·E_below + (p − 1) + r_up`` where r is a residual block's extent
        (1×3×3 then two 3×3×3 convs: 3 in-plane, 2 in z) and ``p − 1`` covers the worst
        alignment of a max-pool window; transposed-conv upsampling (kernel == stride) adds
        nothing. The embedding convs add ``(k − 1)/2`` each. Outputs further than this from a
        block border equal those computed on the whole volume, provided the block's offset is
        a multiple of :attr:`granularity` (so pooling grids coincide).
        """
        block = (2, 3, 3)
        extent = list(block)
        for pool in reversed(self.poolings):
            extent = [2 * b + p * e + p - 1 for b, p, e in zip(block, pool, extent, strict=True)]
        return tuple(e + (k - 1) for e, k in zip(extent, self.embed_kernel, strict=True))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: [list(v) for v in d[k]] if k in ("poolings", "offsets") else d[k] for k in d} | {
            "filters": list(self.filters),
            "embed_kernel": list(self.embed_kernel),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model: unknown key(s) {', '.join(unknown)}")
        return cls(**d)


class FloatBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm computed in fp32 even under bf16 autocast.

    Batch statistics of bf16 activations (8-bit mantissa) over the few voxels of the deepest
    level are too coarse: a near-zero variance estimate blew gradients up to ~1e15 in training.
    Same parameters and state_dict keys as ``nn.BatchNorm3d``; a no-op cast in fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return FloatBatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


def _conv(cin: int, cout: int, kernel: Sequence[int]) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, tuple(kernel), padding=tuple(k // 2 for k in kernel))


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: Sequence[int], norm: str) -> None:
        super().__init__(_conv(cin, cout, kernel), _norm(norm, cout), nn.ELU(inplace=True))


class ResBlock(nn.Module):
    """1×3×3 conv, then two 3×3×3 convs whose output is added to the first conv's."""

    def __init__(self, cin: int, cout: int, norm: str) -> None:
        super().__init__()
        self.inp = ConvNormAct(cin, cout, (1, 3, 3), norm)
        self.conv1 = ConvNormAct(cout, cout, (3, 3, 3), norm)
        self.conv2 = _conv(cout, cout, (3, 3, 3))
        self.norm2 = _norm(norm, cout)
        self.act = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        return self.act(x + self.norm2(self.conv2(self.conv1(x))))


class Encoder(nn.Module):
    """The U-Net's contracting path + global average pool: a ``filters[-1]``-d embedding.

    Shares its parameters with the U-Net it came from (for SimSiam pretraining and CGS).
    """

    def __init__(self, unet: UNet3d) -> None:
        super().__init__()
        self.embed_in = unet.embed_in
        self.down = unet.down
        self.pools = unet.pools
        self.out_features = unet.config.filters[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest feature map ``[N, filters[-1], Z/gz, Y/gy, X/gx]`` (before pooling)."""
        x = self.embed_in(x)
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.pools):
                x = self.pools[i](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3, 4))


class UNet3d(nn.Module):
    """Affinity U-Net: ``float32[N, in, Z, Y, X] → float32[N, len(offsets), Z, Y, X]`` in [0, 1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        f, norm = config.filters, config.norm
        self.embed_in = ConvNormAct(config.in_channels, f[0], config.embed_kernel, norm)
        self.down = nn.ModuleList(ResBlock(f[max(i - 1, 0)], f[i], norm) for i in range(len(f)))
        self.pools = nn.ModuleList(nn.MaxPool3d(p, p) for p in config.poolings)
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose3d(f[i + 1], f[i], p, p), _norm(norm, f[i]), nn.ELU(inplace=True)
            )
            for i, p in enumerate(config.poolings)
        )
        join = 2 if config.skip == "concat" else 1
        self.up_blocks = nn.ModuleList(ResBlock(join * f[i], f[i], norm) for i in range(len(f) - 1))
        self.embed_out = ConvNormAct(f[0], f[0], config.embed_kernel, norm)
        self.head = nn.Conv3d(f[0], config.out_channels, 1)

    @property
    def granularity(self) -> Triple:
        return self.config.granularity

    @property
    def context(self) -> Triple:
        return self.config.context

    def encoder(self) -> Encoder:
        return Encoder(self)

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise :class:`InvalidInputError` unless z/y/x are multiples of the granularity."""
        spatial = tuple(shape[-3:])
        g = self.granularity
        if len(shape) != 5 or any(s % m or s == 0 for s, m in zip(spatial, g, strict=True)):
            raise InvalidInputError(
                f"model input must be N×C×Z×Y×X with Z,Y,X multiples of {g}, got {tuple(shape)}"
            )

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid affinities; losses use these for a numerically stable BCE."""
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The top level's ``filters[0]`` feature maps that the 1×1×1 head reads; training-only
        heads (local shape descriptors) read them too."""
        self.check_shape(x.shape)
        x = self.embed_in(x)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.pools):
                skips.append(x)
                x = self.pools[i](x)
        for i in reversed(range(len(self.ups))):
            x = self.ups[i](x)
            x = torch.cat([x, skips[i]], dim=1) if self.config.skip == "concat" else x + skips[i]
            x = self.up_blocks[i](x)
        return self.embed_out(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward_logits(x))
