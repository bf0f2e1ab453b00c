"""PalmNet: a compact CenterNet-style detector whose forward pass returns final boxes.

The network maps a ``uint8`` RGB tile ``[N, 3, T, T]`` to a stride-4 feature map ``[N, C, T/4, T/4]`` and
predicts, per cell, one heatmap logit per class, a box size and a sub-cell centre offset. Decoding runs in
the graph (and therefore in every runtime that executes the exported ONNX):

* ``heat = sigmoid(logits)``; a cell is a peak when it equals the 3x3 max-pool of its neighbourhood
  (``maxpool`` NMS), other cells are zeroed;
* the ``K`` best peaks over all classes and cells are taken with ``topk`` (sorted, descending);
* for a peak at cell ``(i, j)`` of class ``c`` with offset ``(ox, oy)`` and log-size ``(sw, sh)``::

      cx = (j + ox) * S          cy = (i + oy) * S          (S = stride = 4)
      w  = S * exp(sw)           h  = S * exp(sh)
      box = (cx - w/2, cy - h/2, cx + w/2, cy + h/2),   class_id = c + 1  (COCO id)

* rows scoring below ``score_floor`` become all-zero padding rows, so zero-score rows are padding.

Output ``detections``: ``float32 [N, K, 6]`` = ``(x1, y1, x2, y2, score, class_id)`` in tile pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STRIDE = 4
TILE = 512
#: Detection rows per tile. A plantation at 7.5 m triangular spacing puts ~1,900 palms in a 512 px tile
#: at 0.6 m GSD, so K must be in the thousands; it only sizes the in-graph top-K (training ignores it).
TOP_K = 2048
#: Per-channel RGB mean/std of the training scenes in ``uint8`` units; applied inside the graph.
PIXEL_MEAN = (110.0, 105.0, 90.0)
PIXEL_STD = (45.0, 42.0, 40.0)


@dataclass(frozen=True, slots=True)
class PalmNetConfig:
    """Architecture hyper-parameters; everything the weights' shapes depend on."""

    widths: tuple[int, int, int, int] = (32, 64, 96, 128)
    stem: int = 16
    neck: int = 64
    head: int = 32
    num_classes: int = 2
    top_k: int = TOP_K
    score_floor: float = 0.01

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON view (tuples as lists) for checkpoints and the model card."""
        data = asdict(self)
        data["widths"] = list(self.widths)
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> PalmNetConfig:
        """Inverse of :meth:`to_json`."""
        fields = dict(data)
        fields["widths"] = tuple(fields["widths"])
        return PalmNetConfig(**fields)


class ConvBNReLU(nn.Sequential):
    """3x3 (or ``k``x``k``) convolution, batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ResBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(ch, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(ch)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(self.conv1(x))))


class PalmNet(nn.Module):
    """Backbone (strides 4..32) + top-down FPN neck to stride 4 + heatmap/size/offset heads.

    :meth:`forward` takes ``uint8`` tiles and returns decoded detections (see the module docstring);
    :meth:`raw` returns the head maps for training.
    """

    def __init__(self, config: PalmNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or PalmNetConfig()
        self.config = cfg
        w4, w8, w16, w32 = cfg.widths
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.stem = nn.Sequential(ConvBNReLU(3, cfg.stem, stride=2), ConvBNReLU(cfg.stem, w4, stride=2))
        self.stage4 = ResBlock(w4)
        self.stage8 = nn.Sequential(ConvBNReLU(w4, w8, stride=2), ResBlock(w8))
        self.stage16 = nn.Sequential(ConvBNReLU(w8, w16, stride=2), ResBlock(w16))
        self.stage32 = nn.Sequential(ConvBNReLU(w16, w32, stride=2), ResBlock(w32))
        n = cfg.neck
        self.lat32 = nn.Conv2d(w32, n, 1)
        self.lat16 = nn.Conv2d(w16, n, 1)
        self.lat8 = nn.Conv2d(w8, n, 1)
        self.lat4 = nn.Conv2d(w4, cfg.head, 1)
        self.fuse16 = ConvBNReLU(n, n)
        self.fuse8 = ConvBNReLU(n, n)
        self.reduce4 = nn.Conv2d(n, cfg.head, 1)
        self.fuse4 = ConvBNReLU(cfg.head, cfg.head)
        self.head_conv = ConvBNReLU(cfg.head, cfg.head)
        self.heatmap = nn.Conv2d(cfg.head, cfg.num_classes, 1)
        self.regress = nn.Conv2d(cfg.head, 4, 1)  # (log w, log h, offset x, offset y)
        # Focal-loss prior: start every cell at p = 0.01 so early training is not swamped by negatives.
        with torch.no_grad():
            self.heatmap.bias.fill_(-4.6)  # type: ignore[union-attr]
            self.regress.weight.zero_()
            self.regress.bias.zero_()  # type: ignore[union-attr]
        self.mean: Tensor
        self.inv_std: Tensor

    def normalise(self, images: Tensor) -> Tensor:
        """``uint8`` (or float in 0..255) RGB to the network's input scale."""
        return (images.float() - self.mean) * self.inv_std

    def raw(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Head maps at stride 4: heatmap logits ``[N, C, H, W]`` and regression ``[N, 4, H, W]``."""
        x = self.stem(self.normalise(images))
        c4 = self.stage4(x)
        c8 = self.stage8(c4)
        c16 = self.stage16(c8)
        c32 = self.stage32(c16)
        p = self.lat32(c32)
        p = self.fuse16(self.lat16(c16) + F.interpolate(p, scale_factor=2.0, mode="nearest"))
        p = self.fuse8(self.lat8(c8) + F.interpolate(p, scale_factor=2.0, mode="nearest"))
        p = self.reduce4(F.interpolate(p, scale_factor=2.0, mode="nearest"))
        p = self.fuse4(self.lat4(c4) + p)
        h = self.head_conv(p)
        return self.heatmap(h), self.regress(h)

    def forward(self, images: Tensor) -> Tensor:
        """Decoded detections ``[N, K, 6]`` for ``uint8`` tiles ``[N, 3, T, T]``."""
        logits, reg = self.raw(images)
        return decode(logits, reg, self.config.top_k, self.config.score_floor)


def decode(logits: Tensor, reg: Tensor, top_k: int, score_floor: float) -> Tensor:
    """Peak extraction and top-K over head maps (formula in the module docstring).

    Args:
        logits: heatmap logits ``[N, C, H, W]``.
        reg: ``[N, 4, H, W]`` as log-width, log-height (in stride units), offset x, offset y.
        top_k: rows per image; must not exceed ``C * H * W``.
        score_floor: rows scoring below this are zeroed (padding).

    Returns:
        ``[N, top_k, 6]`` rows ``(x1, y1, x2, y2, score, class_id)`` in input pixels, score-sorted.
    """
    n, c, h, w = logits.shape
    heat = torch.sigmoid(logits)
    peak = F.max_pool2d(heat, 3, 1, 1)
    heat = heat * (heat >= peak).to(heat.dtype)
    scores, idx = torch.topk(heat.reshape(n, c * h * w), top_k, dim=1)
    cls = torch.div(idx, h * w, rounding_mode="floor")
    pix = idx - cls * (h * w)
    ys = torch.div(pix, w, rounding_mode="floor")
    xs = pix - ys * w
    vals = torch.gather(reg.reshape(n, 4, h * w), 2, pix.unsqueeze(1).expand(n, 4, top_k))
    size = torch.exp(vals[:, 0:2].clamp(max=6.0)) * STRIDE
    cx = (xs.to(heat.dtype) + vals[:, 2]) * STRIDE
    cy = (ys.to(heat.dtype) + vals[:, 3]) * STRIDE
    half_w = size[:, 0] * 0.5
    half_h = size[:, 1] * 0.5
    rows = torch.stack(
        [cx - half_w, cy - half_h, cx + half_w, cy + half_h, scores, (cls + 1).to(heat.dtype)], dim=2
    )
    return rows * (scores >= score_floor).to(heat.dtype).unsqueeze(2)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode batch norm into the preceding convolution, in place.

    ``y = gamma * (W x + b - mu) / sqrt(var + eps) + beta`` becomes ``W' x + b'`` with
    ``W' = W * s``, ``b' = (b - mu) * s + beta`` and ``s = gamma / sqrt(var + eps)``.
    """
    assert bn.running_mean is not None
    assert bn.running_var is not None
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())


def fold_batchnorm(model: PalmNet) -> PalmNet:
    """Return an eval-mode copy of ``model`` whose batch norms are folded into their convolutions.

    The folded model computes the same function (up to float rounding) and its ``state_dict`` maps
    one-to-one onto the initializers of the exported ONNX, which lets :func:`load_onnx_weights`
    rebuild a torch twin of a shipped ``model.onnx``.
    """
    folded = PalmNet(model.config)
    folded.load_state_dict(model.state_dict())
    folded.eval()
    with torch.no_grad():
        for module in folded.modules():
            if isinstance(module, ConvBNReLU) and isinstance(module[1], nn.BatchNorm2d):
                conv = module[0]
                assert isinstance(conv, nn.Conv2d)
                _fold(conv, module[1])
                module[1] = nn.Identity()
            elif isinstance(module, ResBlock) and isinstance(module.bn2, nn.BatchNorm2d):
                _fold(module.conv2, module.bn2)
                module.bn2 = nn.Identity()
    return folded


def unfold_batchnorm(folded: PalmNet) -> PalmNet:
    """The inverse of :func:`fold_batchnorm` for fine-tuning a shipped model: a model with batch norms
    that computes the folded model's function in eval mode.

    Each folded convolution keeps its weight ``W'``; its bias ``b'`` moves into the batch norm, whose
    statistics are the identity (``mu = 0``, ``var = 1``, ``gamma = sqrt(1 + eps)``, ``beta = b'``). Train
    it with its batch norms in eval mode (:func:`freeze_batchnorm`): the statistics stay the identity and
    ``gamma``, ``beta`` learn as a per-channel scale and shift.
    """
    model = PalmNet(folded.config)
    state = folded.state_dict()
    plain = model.state_dict()
    pairs: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, ConvBNReLU):
            pairs.append((f"{name}.0", f"{name}.1"))
        elif isinstance(module, ResBlock):
            pairs.append((f"{name}.conv2", f"{name}.bn2"))
    moved = set()
    for conv, bn in pairs:
        plain[f"{conv}.weight"] = state[f"{conv}.weight"]
        plain[f"{bn}.bias"] = state[f"{conv}.bias"]
        norm = model.get_submodule(bn)
        assert isinstance(norm, nn.BatchNorm2d)
        plain[f"{bn}.weight"] = torch.full_like(plain[f"{bn}.weight"], math.sqrt(1.0 + norm.eps))
        plain[f"{bn}.running_mean"] = torch.zeros_like(plain[f"{bn}.running_mean"])
        plain[f"{bn}.running_var"] = torch.ones_like(plain[f"{bn}.running_var"])
        moved |= {f"{conv}.weight", f"{conv}.bias"}
    for key, value in state.items():
        if key not in moved:
            plain[key] = value
    model.load_state_dict(plain)
    return model.eval()


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every batch norm of ``model`` in eval mode (fixed statistics), after ``model.train()``."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()


def folded_skeleton(config: PalmNetConfig) -> PalmNet:
    """An untrained model with the structure of :func:`fold_batchnorm`'s output (for loading weights)."""
    return fold_batchnorm(PalmNet(config))


def conv_flops(model: nn.Module, tile: int = TILE) -> float:
    """FLOPs of one ``tile x tile`` forward pass, counted as 2 x the multiply-accumulates of every
    convolution and linear layer (normalisation, activations and decoding are not counted)."""
    macs = 0

    def hook(module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
            macs += output.numel() * k
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()
            if isinstance(model, PalmNet):
                model.raw(torch.zeros(1, 3, tile, tile, dtype=torch.uint8))
            else:
                model(torch.zeros(1, 3, tile, tile))
    finally:
        for handle in handles:
            handle.remove()
    return 2.0 * macs
