"""ConditionalGlow: a multiscale Glow/RealNVP flow q(x | y) for images x (C, H, W), as one normflows model.

Architecture (Glow, Kingma & Dhariwal 2018; multiscale as in RealNVP, Dinh et al. 2017), read in
the data direction x -> z: squeeze to (4C, H/2, W/2), K steps, factor out half the channels,
squeeze, K steps, ... for `levels` levels. Each step is ActNorm -> 1x1 conv -> affine coupling, and
every coupling also sees a feature map of the measurement y at its own resolution, made once per y
by a small CNN pyramid (`MeasurementEncoder`); the tuple of those maps is the normflows context.

Why one flat list rather than normflows' MultiscaleFlow: MultiscaleFlow passes only class labels to
its base distributions, and `ConditionalNormalizingFlow` gives the context to every layer of one
list. So the multiscale structure is "squeeze-all": z (C, H, W) is squeezed `levels` times at the
start of the sampling direction, and a layer of level l acts on the first C * 2^(l+1) channels of
the full tensor only; the channels behind them are the latents factored out at finer levels, which
pass through untouched and reach their own squeezes (a squeeze keeps a channel's four children
contiguous, so "the first n channels" stays the active block at every level). No Split/Merge state
is carried between layers, splits are channel slices (no masks), and z keeps x's spatial layout.

ActNorm here is a plain learnable per-channel affine (normflows `AffineConstFlow`) started at the
identity, without Glow's data-dependent initialisation: that init turns the parameters bf16 when
the first call runs under autocast and differs per rank under DDP (docs/flows.md), and a flow
trained by reverse KL has no data batch to initialise from anyway. With zero-initialised coupling
outputs and identity ActNorms the flow starts as a random rotation per pixel block: x = Q z, log_q =
log N(z).

A class label is the least a flow can be told: the couplings must make the whole digit from it. For
the classifier operator the flow can end with a per-class template and spread (`class_template`,
`ConditionalPixelAffine`), started at the class-conditional mean and std of the training images, so
the flow starts as the class's Gaussian and the couplings learn the rest; without it the
classifier flows collapsed to one image for every label (docs/flows.md).

Stronger variants, each off by default (a flow built at the defaults is the plain conditional Glow, its
config and weights unchanged): `encoder_blocks` gives the encoder residual blocks at every scale and a
top-down path; `coupling_blocks` residual blocks in every coupling network; `attention_levels` a
self-attention layer in the couplings of the coarsest levels; `tarflow_blocks` conditional TarFlow blocks
(aps.flows.tarflow) on the coarsest tokens before the Glow levels, in the sampling direction.

Speed (the sampler draws thousands of x per y): y is encoded once and its maps are broadcast over
the n samples of each measurement inside the couplings (`forward` does not repeat the context);
the maps enter each coupling through a 1x1 conv, since a 3x3 over them would be most of the
compute; the invertible stream stays fp32 and only the coupling networks run in bf16 under autocast.
"""
from __future__ import annotations

from typing import Callable

import normflows as nf
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ApsError
from .base import ConditionalFlow, standard_normal_log_prob
from .layers import ConditionalAffineCoupling, ConditionalPixelAffine, LUInvertibleConv1x1, Unconditional
from .tarflow import ConditionalTarFlowBlock

Y_KINDS = ("image", "small_image", "vector", "class")


class ResidualBlock(nn.Module):
    """h + conv3x3(ReLU(conv3x3(ReLU(h)))), channels kept: (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, h):
        return h + self.net(h)


class MeasurementEncoder(nn.Module):
    """A CNN pyramid from y to one feature map per flow level.

    y is first made an image of x's size (C_in, H, W): "image" as is, "small_image" upsampled
    bilinearly, "vector" through a linear layer to one channel (a learned linear reconstruction),
    "class" through an embedding to one channel (a learned template); an optional extra feature
    image (e.g. A^T y) is concatenated. A 3x3 stem, then per level a stride-2 block, gives the maps.
    With `blocks` > 0 every scale (the stem's full resolution and each level's) also runs that many
    residual blocks, and a top-down path (as a feature pyramid network, Lin et al. 2017) adds each
    coarser level's features, upsampled, to the finer ones: every map then sees the whole of y, as
    SRFlow's encoder features do (Lugmayr et al. 2020), not only a window of a few convs. The
    encoder runs once per y, so its size costs little per sample.
    With `class_template` ("class" only) one more item follows the maps: a learned image and
    log-scale of the class, (t, s), each (B, C, H, W), for the flow's last layer.

    Args:
        event_shape: (C, H, W) of x.
        y_shape: (Cy, H, W) for "image", (Cy, H/f, W/f) for "small_image", (m,) for "vector", () for "class".
        y_kind: one of Y_KINDS.
        levels: L, the number of maps (resolutions H/2 .. H/2^L).
        cond_channels: channels of every map.
        n_classes: classes for "class".
        extra_channels: channels of the extra feature image (0: none).
        class_template: also give (t, s) per class (see above).
        blocks: residual blocks per scale, with the top-down path (0: the plain pyramid).
    Shapes: y (B, *y_shape), extra (B, extra_channels, H, W) -> tuple of L tensors (B, cond_channels, H/2^l, W/2^l)
        [+ the pair (t, s)].
    """

    def __init__(self, event_shape, y_shape, y_kind, levels, cond_channels, n_classes, extra_channels,
                 class_template: bool = False, blocks: int = 0):
        super().__init__()
        c, h, w = event_shape
        if class_template:  # (t, s) per class for the flow's last layer (ConditionalPixelAffine), identity to start
            self.template = nn.Embedding(n_classes, c * h * w)
            self.template_log_scale = nn.Embedding(n_classes, c * h * w)
            nn.init.zeros_(self.template.weight)
            nn.init.zeros_(self.template_log_scale.weight)
        self.class_template, self.event_shape = class_template, tuple(event_shape)
        self.y_kind, self.size = y_kind, (h, w)
        if y_kind in ("image", "small_image"):
            stem_in = y_shape[0]
        elif y_kind == "vector":
            self.lift = nn.Linear(y_shape[0], h * w)
            stem_in = 1
        else:
            self.lift = nn.Embedding(n_classes, h * w)
            stem_in = 1
        self.stem = nn.Conv2d(stem_in + extra_channels, cond_channels, 3, padding=1)
        # pre-activation blocks: the maps handed to the couplings are linear outputs (either sign)
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(cond_channels, cond_channels, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(cond_channels, cond_channels, 3, padding=1),
            )
            for _ in range(levels)
        )
        self.blocks = blocks
        if blocks:
            width = cond_channels
            self.stem_blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(blocks)))
            self.level_blocks = nn.ModuleList(
                nn.Sequential(*(ResidualBlock(width) for _ in range(blocks))) for _ in range(levels))
            # top-down: level l's map = out_l(f_l + up(g_{l+1})), from the coarsest level to the finest
            self.lateral = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(levels - 1))
            self.out = nn.ModuleList(
                nn.Sequential(nn.ReLU(), nn.Conv2d(width, cond_channels, 3, padding=1)) for _ in range(levels))

    def forward(self, y: torch.Tensor, extra: torch.Tensor | None = None) -> tuple:
        b = y.shape[0]
        dtype = self.stem.weight.dtype
        if self.y_kind == "image":
            img = y.to(dtype)
        elif self.y_kind == "small_image":
            img = F.interpolate(y.to(dtype), size=self.size, mode="bilinear", align_corners=False)
        elif self.y_kind == "vector":
            img = self.lift(y.to(dtype)).view(b, 1, *self.size)
        else:
            img = self.lift(y.reshape(b).long()).view(b, 1, *self.size)
        if extra is not None:
            img = torch.cat([img, extra.reshape(b, -1, *self.size).to(img.dtype)], 1)
        h = self.stem(img)
        maps = []
        if not self.blocks:
            for block in self.down:
                h = block(h)
                maps.append(h)
        else:
            h = self.stem_blocks(h)
            for down, blocks in zip(self.down, self.level_blocks):
                h = blocks(down(h))
                maps.append(h)  # bottom-up f_l (B, cond, H/2^(l+1), W/2^(l+1))
            g = maps[-1]
            outs = [self.out[-1](g)]
            for l in reversed(range(len(maps) - 1)):
                g = maps[l] + self.lateral[l](F.interpolate(g, scale_factor=2.0, mode="nearest"))
                outs.append(self.out[l](g))
            maps = outs[::-1]
        if self.class_template:
            label = y.reshape(b).long()
            maps.append((self.template(label).view(b, *self.event_shape),
                         self.template_log_scale(label).view(b, *self.event_shape)))
        return tuple(maps)


class ConditionalGlow(ConditionalFlow):
    """Conditional multiscale Glow q_phi(x | y) for x (C, H, W): one normflows ConditionalNormalizingFlow.

    Args:
        event_shape: (C, H, W); H and W divisible by 2^levels.
        y_shape: the measurement's shape per item (see `MeasurementEncoder`).
        y_kind: "image" | "small_image" | "vector" | "class".
        levels: multiscale levels L (3 for 32x32); level l runs at H/2^l on C * 2^(l+1) channels.
        steps_per_level: K, Glow steps (ActNorm, 1x1 conv, coupling) per level.
        hidden_channels: width of each coupling network.
        cond_channels: width of the measurement features.
        clamp: bound on the log-scale of each coupling (soft, tanh).
        n_classes: number of classes for y_kind "class" (y holds integers 0 .. n_classes - 1).
        extra_channels: channels of an extra feature image (e.g. A^T y, reshaped to (extra_channels, H, W))
            concatenated to the encoder's input; given to `encode(y, extra)`, or made by
            `self.backprojection(y)` (a plain callable set after construction, not saved) when
            `forward`/`sample`/`log_prob` call `encode(y)`.
        class_template: y_kind "class" only: end the flow (sampling direction) with x = t_c + exp(s_c) * x',
            a learned image and log-scale per class (`ConditionalPixelAffine`); `init_class_template` starts
            them at the class's training-image mean and std.
        encoder_blocks: residual blocks per scale of the measurement encoder, with its top-down path
            (`MeasurementEncoder`; 0: the plain pyramid).
        coupling_blocks: residual blocks in every coupling network (`ConditionalAffineCoupling`; 0: Glow's).
        attention_levels: the couplings of this many coarsest levels end their network with a self-attention
            layer over the level's positions (0: none).
        tarflow_blocks: conditional TarFlow blocks (`ConditionalTarFlowBlock`, a causal transformer over the
            (H/2^L) * (W/2^L) tokens of 2^L x 2^L patches) at the start of the sampling direction, before the
            Glow levels; sampling runs them sequentially over those tokens (0: none).
        tarflow_width, tarflow_layers: width and layers of each TarFlow block's transformer.
    Shapes: `sample(y, n)`: y (B, *y_shape) -> x (B, n, C, H, W), log_q (B, n); `log_prob(x, y)` -> (B,).

    Example:
        >>> flow = ConditionalGlow((1, 8, 8), (2, 8, 8), "image", levels=2, steps_per_level=2)
        >>> x, log_q = flow.sample(torch.randn(3, 2, 8, 8), n=5)
        >>> x.shape, log_q.shape
        (torch.Size([3, 5, 1, 8, 8]), torch.Size([3, 5]))
    """

    def __init__(
        self,
        event_shape,
        y_shape,
        y_kind: str = "image",
        levels: int = 3,
        steps_per_level: int = 8,
        hidden_channels: int = 64,
        cond_channels: int = 32,
        clamp: float = 2.0,
        n_classes: int = 10,
        extra_channels: int = 0,
        class_template: bool = False,
        encoder_blocks: int = 0,
        coupling_blocks: int = 0,
        attention_levels: int = 0,
        tarflow_blocks: int = 0,
        tarflow_width: int = 128,
        tarflow_layers: int = 2,
    ):
        super().__init__()
        self.event_shape, self.y_shape = tuple(event_shape), tuple(y_shape)
        self._args = dict(
            y_kind=y_kind, levels=levels, steps_per_level=steps_per_level, hidden_channels=hidden_channels,
            cond_channels=cond_channels, clamp=float(clamp), n_classes=n_classes, extra_channels=extra_channels,
        )
        # options recorded only when not at their defaults, so configs of flows without them stay as they were
        if class_template:
            self._args["class_template"] = True
        for key, value in (("encoder_blocks", encoder_blocks), ("coupling_blocks", coupling_blocks),
                           ("attention_levels", attention_levels)):
            if value:
                self._args[key] = value
        if tarflow_blocks:
            self._args.update(tarflow_blocks=tarflow_blocks, tarflow_width=tarflow_width, tarflow_layers=tarflow_layers)
        self._check_args()
        self.extra_channels = extra_channels
        self.backprojection: Callable | None = None
        self.encoder = MeasurementEncoder(
            self.event_shape, self.y_shape, y_kind, levels, cond_channels, n_classes, extra_channels, class_template,
            encoder_blocks,
        )
        c = self.event_shape[0]
        # sampling order (z -> x): squeeze z to the coarsest level, then from coarse to fine the
        # level's steps (coupling, 1x1 conv, ActNorm: a Glow step read backwards) and an un-squeeze
        # (normflows' Squeeze.forward un-squeezes; Reverse makes it squeeze)
        flows = [Unconditional(nf.flows.Reverse(nf.flows.Squeeze())) for _ in range(levels)]
        _, h, w = self.event_shape
        # TarFlow blocks first: on the whole tensor at the coarsest resolution, tokens of 2^L x 2^L patches,
        # so they also correlate the latents that finer levels factor out (a conditional, learned base)
        coarse = (h // 2 ** levels, w // 2 ** levels)
        flows += [ConditionalTarFlowBlock(c * 4 ** levels, cond_channels, coarse, tarflow_width, tarflow_layers, clamp,
                                          levels - 1, reverse=bool(k % 2)) for k in range(tarflow_blocks)]
        for level in reversed(range(levels)):
            n = c * 2 ** (level + 2)
            size = (h // 2 ** (level + 1), w // 2 ** (level + 1))
            attention = size if level >= levels - attention_levels else None
            for _ in range(steps_per_level):
                flows += [
                    ConditionalAffineCoupling(n, cond_channels, hidden_channels, clamp, level, coupling_blocks, attention),
                    LUInvertibleConv1x1(n),
                    Unconditional(nf.flows.AffineConstFlow((n, 1, 1)), n),
                ]
            flows.append(Unconditional(nf.flows.Squeeze()))
        if class_template:
            flows.append(ConditionalPixelAffine(index=levels))
        q0 = nf.distributions.DiagGaussian(self.event_shape, trainable=False)
        self.nf = nf.ConditionalNormalizingFlow(q0, flows)

    def _check_args(self):
        a, ev, ys = self._args, self.event_shape, self.y_shape
        if a["y_kind"] not in Y_KINDS:
            raise ApsError(f"y_kind must be one of {Y_KINDS}, got {a['y_kind']!r}")
        if len(ev) != 3:
            raise ApsError(f"event_shape must be (C, H, W), got {ev}")
        if a["levels"] < 1 or a["steps_per_level"] < 1:
            raise ApsError("levels and steps_per_level must be >= 1")
        if a.get("encoder_blocks", 0) < 0 or a.get("coupling_blocks", 0) < 0:
            raise ApsError("encoder_blocks and coupling_blocks must be >= 0")
        if a.get("tarflow_blocks", 0) < 0:
            raise ApsError(f"tarflow_blocks must be >= 0, got {a['tarflow_blocks']}")
        if a.get("tarflow_blocks") and (a["tarflow_width"] < 1 or a["tarflow_layers"] < 1):
            raise ApsError("tarflow_width and tarflow_layers must be >= 1")
        if not 0 <= a.get("attention_levels", 0) <= a["levels"]:
            raise ApsError(f"attention_levels must be in 0 .. levels = {a['levels']}, got {a['attention_levels']}")
        _, h, w = ev
        f = 2 ** a["levels"]
        if h % f or w % f:
            raise ApsError(f"H and W of {ev} must be divisible by 2^levels = {f}")
        kind = a["y_kind"]
        if kind == "image" and (len(ys) != 3 or ys[1:] != (h, w)):
            raise ApsError(f"y_kind 'image' needs y_shape (Cy, {h}, {w}), got {ys}")
        if kind == "small_image" and (len(ys) != 3 or h % ys[1] or w % ys[2] or h // ys[1] != w // ys[2]):
            raise ApsError(f"y_kind 'small_image' needs y_shape (Cy, {h}/f, {w}/f), got {ys}")
        if kind == "vector" and len(ys) != 1:
            raise ApsError(f"y_kind 'vector' needs y_shape (m,), got {ys}")
        if kind == "class":
            if ys not in ((), (1,)):
                raise ApsError(f"y_kind 'class' needs y_shape () or (1,), got {ys}")
            if a["n_classes"] < 1:
                raise ApsError("n_classes must be >= 1")
            if a["extra_channels"]:
                raise ApsError("y_kind 'class' takes no extra feature image")
        elif a.get("class_template"):
            raise ApsError(f"class_template needs y_kind 'class', got {kind!r}")

    @torch.no_grad()
    def init_class_template(self, mean: torch.Tensor, std: torch.Tensor, min_std: float = 0.05) -> None:
        """Start the class template at per-class image statistics: mean, std (n_classes, C, H, W).

        The last layer then starts as x = mean_c + max(std_c, min_std) * x', and the encoder's class
        embedding (the one-channel image every coupling's features start from) as the channel-mean of
        mean_c. min_std keeps the always-black border from starting as a near-singular direction.
        """
        enc = self.encoder
        if not enc.class_template:
            raise ApsError("this flow was built without class_template")
        shape = (enc.template.num_embeddings, *self.event_shape)
        if tuple(mean.shape) != shape or tuple(std.shape) != shape:
            raise ApsError(f"class template statistics must have shape {shape}, got {tuple(mean.shape)} and {tuple(std.shape)}")
        enc.template.weight.copy_(mean.flatten(1))
        enc.template_log_scale.weight.copy_(std.clamp_min(min_std).log().flatten(1))
        enc.lift.weight.copy_(mean.mean(1).flatten(1))

    def encode(self, y: torch.Tensor, extra: torch.Tensor | None = None) -> tuple:
        """Context from y (B, *y_shape) [and an extra image (B, extra_channels, H, W)]: L maps (B, cond, H/2^l, W/2^l)."""
        if tuple(y.shape[1:]) != self.y_shape:
            raise ApsError(f"y must have shape (B, {', '.join(map(str, self.y_shape))}), got {tuple(y.shape)}")
        if self.extra_channels and extra is None:
            if self.backprojection is None:
                raise ApsError("this flow takes an extra feature image: pass encode(y, extra) or set flow.backprojection")
            extra = self.backprojection(y)
        if extra is not None and not self.extra_channels:
            raise ApsError("this flow was built with extra_channels=0 and takes no extra feature image")
        return self.encoder(y, extra)

    def forward(self, z: torch.Tensor, y: torch.Tensor):
        """Sampling direction: z (B * n, C, H, W), y (B, *y_shape) -> x (B * n, C, H, W), log_q (B * n,).

        As `ConditionalFlow.forward`, but the context is not repeated n times: the couplings broadcast
        it over the n samples of each measurement, which saves the memory and the conditioning convs
        of n - 1 copies.
        """
        x, log_det = self.nf.forward_and_log_det(z, context=self.encode(y))
        return x, standard_normal_log_prob(z) - log_det

    def config(self) -> dict:
        """{"type": "glow", constructor arguments}: `aps.checkpoint.build_flow` rebuilds the flow from it."""
        return dict(type="glow", event_shape=list(self.event_shape), y_shape=list(self.y_shape), **self._args)
