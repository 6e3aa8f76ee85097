"""HarDNet (Harmonic DenseNet) image classifiers: 39ds, 68ds, 68 and 85.

Chao et al., "HarDNet: A Low Memory Traffic Network", ICCV 2019.

Our own implementation. Module names, module order and therefore ``state_dict`` keys follow the
published checkpoints exactly (``base.<i>...``), so the official ``.pth`` files load strictly.
Everything that differs between the variants lives in the :data:`ARCHS` table; the code below
never branches on a variant's name.

The forward passes only loop over lists fixed at construction time (no data-dependent Python
control flow), so the model works with ``torch.compile``, ``channels_last`` and autocast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hnq.errors import ConfigError
from hnq.models import MODELS

__all__ = [
    "ARCHS",
    "CombConvLayer",
    "ConvLayer",
    "DWConvLayer",
    "HarDBlock",
    "HarDNet",
    "HarDNetConfig",
    "StageConfig",
    "UnknownModelError",
    "build_hardnet",
    "list_models",
    *MODELS,
]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class ConvLayer(nn.Sequential):
    """``k x k`` convolution (no bias, 'same' padding) -> BatchNorm -> ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.norm = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU6(inplace=True)


class DWConvLayer(nn.Sequential):
    """Depthwise 3x3 convolution -> BatchNorm, deliberately *without* an activation."""

    def __init__(self, channels: int, stride: int = 1):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)
        self.norm = nn.BatchNorm2d(channels)


class CombConvLayer(nn.Sequential):
    """Pointwise :class:`ConvLayer` followed by a :class:`DWConvLayer` (the "ds" variants' layer)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1):
        super().__init__()
        self.layer1 = ConvLayer(in_channels, out_channels, kernel_size)
        self.layer2 = DWConvLayer(out_channels, stride=stride)


def harmonic_links(layer: int) -> tuple[int, ...]:
    """Indices of the earlier outputs that layer ``layer`` (1-based; 0 = block input) reads.

    Layer ``L`` reads ``L - 2**i`` for every ``2**i`` dividing ``L``: most recent first, which is
    also the order in which they are concatenated.
    """
    links = []
    step = 1
    while step <= layer and layer % step == 0:
        links.append(layer - step)
        step *= 2
    return tuple(links)


def _layer_width(growth: int, grmul: float, n_links: int) -> int:
    """Output channels of a layer with ``n_links`` inputs: growth * grmul**(n_links-1), made even."""
    width = float(growth)
    for _ in range(n_links - 1):  # repeated multiplication, as the published models were sized
        width *= grmul
    return int(int(width + 1) / 2) * 2


class HarDBlock(nn.Module):
    """A harmonic dense block.

    Output ``0`` is the block input; layer ``L`` (1-based) consumes the channel-concatenation of
    the outputs listed in ``links[L-1]``. The block returns the concatenation of the odd-numbered
    layers' outputs and of the last layer's output (the input itself is not passed through).
    """

    def __init__(self, in_channels: int, growth: int, grmul: float, n_layers: int, depthwise: bool):
        super().__init__()
        widths = [in_channels]
        links: list[tuple[int, ...]] = []
        in_widths: list[int] = []
        layers = []
        for layer in range(1, n_layers + 1):
            link = harmonic_links(layer)
            in_ch = sum(widths[j] for j in link)
            out_ch = _layer_width(growth, grmul, len(link))
            layers.append(CombConvLayer(in_ch, out_ch) if depthwise else ConvLayer(in_ch, out_ch, 3))
            links.append(link)
            in_widths.append(in_ch)
            widths.append(out_ch)
        self.layers = nn.ModuleList(layers)
        self.links: tuple[tuple[int, ...], ...] = tuple(links)
        self.layer_in_channels: tuple[int, ...] = tuple(in_widths)
        self.layer_out_channels: tuple[int, ...] = tuple(widths[1:])
        self.out_indices: tuple[int, ...] = tuple(
            j for j in range(1, n_layers + 1) if j % 2 == 1 or j == n_layers
        )
        self.in_channels = in_channels
        self.out_channels = sum(widths[j] for j in self.out_indices)

    def forward(self, x: Tensor) -> Tensor:
        outputs = [x]
        for link, layer in zip(self.links, self.layers):
            if len(link) == 1:
                inp = outputs[link[0]]
            else:
                inp = torch.cat([outputs[j] for j in link], 1)
            outputs.append(layer(inp))
        return torch.cat([outputs[j] for j in self.out_indices], 1)


# --------------------------------------------------------------------------------------------
# Variant table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    """One HarDBlock, then a 1x1 ConvLayer to ``out_channels``, then optionally a 2x downsample."""

    growth: int
    n_layers: int
    out_channels: int
    downsample: bool


@dataclass(frozen=True)
class HarDNetConfig:
    stem_channels: tuple[int, int]  # widths of the two stem ConvLayers (the first has stride 2)
    stem_kernel: int  # kernel of the second stem ConvLayer
    depthwise: bool  # True: CombConvLayer in the blocks; False: 3x3 ConvLayer
    downsample: str  # "maxpool" or "dwconv"
    grmul: float  # width multiplier per extra harmonic link
    stages: tuple[StageConfig, ...]
    dropout: float  # before the classifier
    last_stage_dropout: float | None = None  # an nn.Dropout between the last block and its 1x1 conv

    @property
    def num_features(self) -> int:
        return self.stages[-1].out_channels


def _stages(growth, n_layers, out_channels, downsample) -> tuple[StageConfig, ...]:
    rows = (growth, n_layers, out_channels, downsample)
    assert len({len(r) for r in rows}) == 1
    return tuple(StageConfig(g, n, c, bool(d)) for g, n, c, d in zip(*rows))


#: one configuration per variant, in hnq.models.MODELS order (the comment names each)
ARCHS: dict[str, HarDNetConfig] = dict(zip(MODELS, (
    HarDNetConfig(  # hardnet39ds
        stem_channels=(24, 48), stem_kernel=1, depthwise=True, downsample="dwconv", grmul=1.6,
        stages=_stages(growth=(16, 20, 64, 160), n_layers=(4, 16, 8, 4),
                       out_channels=(96, 320, 640, 1024), downsample=(1, 1, 1, 0)),
        dropout=0.05,
    ),
    HarDNetConfig(  # hardnet68ds
        stem_channels=(32, 64), stem_kernel=1, depthwise=True, downsample="dwconv", grmul=1.7,
        stages=_stages(growth=(14, 16, 20, 40, 160), n_layers=(8, 16, 16, 16, 4),
                       out_channels=(128, 256, 320, 640, 1024), downsample=(1, 0, 1, 1, 0)),
        dropout=0.05,
    ),
    HarDNetConfig(  # hardnet68
        stem_channels=(32, 64), stem_kernel=3, depthwise=False, downsample="maxpool", grmul=1.7,
        stages=_stages(growth=(14, 16, 20, 40, 160), n_layers=(8, 16, 16, 16, 4),
                       out_channels=(128, 256, 320, 640, 1024), downsample=(1, 0, 1, 1, 0)),
        dropout=0.1,
    ),
    HarDNetConfig(  # hardnet85
        stem_channels=(48, 96), stem_kernel=3, depthwise=False, downsample="maxpool", grmul=1.7,
        stages=_stages(growth=(24, 24, 28, 36, 48, 256), n_layers=(8, 16, 16, 16, 16, 4),
                       out_channels=(192, 256, 320, 480, 720, 1280), downsample=(1, 0, 1, 0, 1, 0)),
        dropout=0.2, last_stage_dropout=0.1,
    ),
), strict=True))


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def _downsample(kind: str, channels: int, *, stem: bool) -> nn.Module:
    if kind == "maxpool":
        return nn.MaxPool2d(3, stride=2, padding=1) if stem else nn.MaxPool2d(2, stride=2)
    if kind == "dwconv":
        return DWConvLayer(channels, stride=2)
    raise ValueError(f"unknown downsample kind {kind!r} (expected 'maxpool' or 'dwconv')")


class HarDNet(nn.Module):
    """HarDNet classifier. All layers sit in one flat ``base`` ModuleList (checkpoint layout):
    stem, then per stage HarDBlock / 1x1 ConvLayer / optional downsample, then the head
    ``Sequential(AdaptiveAvgPool2d, Flatten, Dropout, Linear)``.
    """

    def __init__(self, config: HarDNetConfig, num_classes: int = 1000):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.config = config
        self.num_classes = num_classes
        c0, c1 = config.stem_channels
        base: list[nn.Module] = [
            ConvLayer(3, c0, 3, stride=2),
            ConvLayer(c0, c1, config.stem_kernel),
            _downsample(config.downsample, c1, stem=True),
        ]
        ch = c1
        last = len(config.stages) - 1
        for i, stage in enumerate(config.stages):
            block = HarDBlock(ch, stage.growth, config.grmul, stage.n_layers, config.depthwise)
            base.append(block)
            if i == last and config.last_stage_dropout is not None:
                base.append(nn.Dropout(config.last_stage_dropout))
            base.append(ConvLayer(block.out_channels, stage.out_channels, 1))
            ch = stage.out_channels
            if stage.downsample:
                base.append(_downsample(config.downsample, ch, stem=False))
        base.append(
            nn.Sequential(
                nn.AdaptiveAvgPool2d((1, 1)),
                nn.Flatten(1),
                nn.Dropout(config.dropout),
                nn.Linear(ch, num_classes),
            )
        )
        self.base = nn.ModuleList(base)

    @property
    def classifier(self) -> nn.Linear:
        return self.base[-1][-1]

    def forward(self, x: Tensor) -> Tensor:
        for module in self.base:
            x = module(x)
        return x


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


class UnknownModelError(ConfigError, ValueError):
    """A model name not in :data:`ARCHS` (both a :class:`ConfigError` and a ``ValueError``)."""

    def __init__(self, name: object):
        super().__init__(f"unknown HarDNet model {name!r}; available: {', '.join(ARCHS)}")
        self.name = name


def list_models() -> list[str]:
    """Names of the available variants, smallest first."""
    return list(ARCHS)


def build_hardnet(name: str, *, num_classes: int = 1000, **kwargs) -> HarDNet:
    """Build an untrained HarDNet variant by name (see :data:`ARCHS`)."""
    if kwargs:
        raise TypeError(
            f"{name}: unexpected keyword argument(s) {', '.join(sorted(kwargs))}; "
            "the only supported option is num_classes"
        )
    try:
        config = ARCHS[name]
    except (KeyError, TypeError):
        raise UnknownModelError(name) from None
    return HarDNet(config, num_classes=num_classes)


def _builder(name: str):
    def build(**kwargs) -> HarDNet:
        return build_hardnet(name, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"An untrained {name} (keyword: num_classes); see :func:`build_hardnet`."
    return build


# hardnet39ds(**kwargs), hardnet68(**kwargs), ...: one builder per registry name (not typed here,
# so that a variant added to hnq.models and ARCHS gets one).
globals().update({name: _builder(name) for name in MODELS})
