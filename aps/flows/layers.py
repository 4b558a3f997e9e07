"""normflows `Flow` layers for conditional multiscale image flows (used by `aps.flows.image`).

Direction as in `aps.flows.base`: `forward(z, context)` runs z -> x (sampling) and returns
(x, log|det dx/dz|) per batch item; `inverse(x, context)` runs x -> z with the negated log-det.

Why these exist rather than normflows' own Glow pieces (docs/flows.md, "normflows and accelerate"):
`ConditionalNormalizingFlow` calls every layer as `flow(z, context=context)`, and normflows'
ActNorm, Invertible1x1Conv, AffineCoupling and Squeeze take no `context` (a TypeError), so the
context-free ones are wrapped by `Unconditional`, and the coupling, which must see the measurement,
is written here. normflows' Invertible1x1Conv also inverts in fp64 on every sampling call and builds
with the deprecated `Tensor.lu()`; `LUInvertibleConv1x1` applies W itself in the sampling direction
and needs an inverse only for `log_prob`.

Multiscale layout ("squeeze-all"): the whole tensor is always present. A layer of level l acts on the
first `channels` channels only and passes the rest (the latents factored out at finer levels)
through untouched, so the normflows model stays one flat list over one tensor.

Mixed precision: the invertible stream (z, the 1x1 mixing, the affine update, log-dets) stays in
the parameters' dtype (fp32); only the coupling networks run under autocast (bf16). A bf16 stream
would cost ~1e-2 round-trip error and bf16 log-dets.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from normflows.flows import Flow
from torch import nn


class Unconditional(Flow):
    """A context-free normflows layer inside a conditional flow, optionally on the first channels only.

    Args:
        flow: a normflows `Flow` whose forward/inverse take only z, e.g. `AffineConstFlow`, `Squeeze`.
        channels: apply it to z[:, :channels] and pass z[:, channels:] through; None: to all of z.
    Shapes: z (B, C, h, w) -> (B, C, h, w) (a Squeeze changes C, h, w), log_det (B,) or a scalar.
    """

    def __init__(self, flow: Flow, channels: int | None = None):
        super().__init__()
        self.flow = flow
        self.channels = channels

    def _run(self, fn, z):
        # normflows' Squeeze reshapes with .view, which needs contiguous memory (x from a caller may not be)
        z = z.contiguous()
        if self.channels is None or self.channels == z.shape[1]:
            return fn(z)
        h, log_det = fn(z[:, : self.channels])
        return torch.cat([h, z[:, self.channels:]], 1), log_det

    def forward(self, z, context=None):
        return self._run(self.flow.forward, z)

    def inverse(self, z, context=None):
        return self._run(self.flow.inverse, z)


class LUInvertibleConv1x1(Flow):
    """Invertible 1x1 convolution x = W z per pixel on the first `channels` channels, W = P L (U + diag(s)).

    Glow (Kingma & Dhariwal 2018, sec. 3.2), LU-parametrised: log|det| = h * w * sum(log|s|) costs
    nothing, and the sampling direction applies W itself (no inverse); `inverse` solves with the
    small C x C matrix. Initialised at a random rotation (log-det 0), as in Glow.

    Args:
        channels: C, the number of channels mixed; the others pass through.
    Shapes: z (B, >= C, h, w) -> x (B, >= C, h, w), log_det (B,).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, l, u = torch.linalg.lu(q)
        s = torch.diagonal(u)
        self.register_buffer("perm", p)  # fixed: a permutation cannot be learned by gradient
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(l, -1))
        self.upper = nn.Parameter(torch.triu(u, 1))
        self.log_s = nn.Parameter(s.abs().log())

    def _factors(self):
        eye = torch.eye(self.channels, dtype=self.log_s.dtype, device=self.log_s.device)
        l = torch.tril(self.lower, -1) + eye
        u = torch.triu(self.upper, 1) + torch.diag(self.sign_s * self.log_s.exp())
        return l, u, eye

    def weight(self) -> torch.Tensor:
        """W (C, C), assembled in the parameters' dtype."""
        l, u, _ = self._factors()
        return self.perm @ l @ u

    def weight_inverse(self) -> torch.Tensor:
        """W^-1 = U^-1 L^-1 P^T (C, C) from the factors by two triangular solves.

        Not torch.linalg.inv(W): that LU-factorises W again and checks the result on the host (a device sync
        per layer and call, which stalls a GPU training step); W is invertible by construction (exp(log_s) > 0).
        """
        l, u, eye = self._factors()
        l_inv = torch.linalg.solve_triangular(l, eye, upper=False, unitriangular=True)
        u_inv = torch.linalg.solve_triangular(u, eye, upper=True)
        return u_inv @ l_inv @ self.perm.T

    def _mix(self, z, w, sign):
        # autocast off: W and the stream stay in fp32 (a bf16 W would break W^-1 W = I and the log-det);
        # the op is C x C per pixel, memory-bound, so fp32 costs nothing that matters
        with torch.autocast(z.device.type, enabled=False):
            w = w.to(z.dtype)
            n = self.channels
            h = F.conv2d(z[:, :n], w[:, :, None, None])
            if n != z.shape[1]:
                h = torch.cat([h, z[:, n:]], 1)
            log_det = sign * z.shape[2] * z.shape[3] * self.log_s.sum()
        return h, log_det.expand(z.shape[0])

    def forward(self, z, context=None):
        with torch.autocast(z.device.type, enabled=False):
            w = self.weight()
        return self._mix(z, w, 1.0)

    def inverse(self, x, context=None):
        with torch.autocast(x.device.type, enabled=False):
            w_inv = self.weight_inverse()
        return self._mix(x, w_inv, -1.0)


class ConditionalAffineCoupling(Flow):
    """Affine coupling whose network also sees the measurement's features at this resolution.

    On the first `channels` channels of z, split into halves (a, b):
        (raw, t) = NN(z_a, c),   s = clamp * tanh(raw / clamp),   x_b = z_b * exp(s) + t,   x_a = z_a,
    log|det| = sum s. RealNVP (Dinh et al. 2017) with a conditioning input (as in SRFlow, Lugmayr
    et al. 2020); the soft clamp bounds |s| by `clamp` while letting the flow contract as well as
    expand (normflows' sigmoid scale can only expand, its exp scale is unbounded: docs/flows.md).
    The last conv is zero-initialised, so the layer starts as the identity.

    Args:
        channels: C (even), channels coupled; the rest of z passes through.
        cond_channels: channels of the context feature map `context[level]` (B', cond_channels, h, w), where
            B' is z's batch or divides it (then z's rows i*n .. i*n + n - 1 belong to context row i).
        hidden_channels: width of the coupling network.
        clamp: bound on |s|.
        level: which item of the context tuple this layer reads.
        blocks: 0: Glow's network (3x3, 1x1, 3x3 convs); B > 0: B residual blocks (3x3 and 1x1 conv each) instead
            of the middle 1x1, a deeper network at the same width.
        attention_size: (h, w) of this level to add a self-attention layer over its h * w positions after the
            blocks (`SpatialSelfAttention`), so that the scale and shift of a pixel can depend on the whole
            image at this level; None: none.
    Shapes: z (B, >= C, h, w) -> x (B, >= C, h, w), log_det (B,).
    """

    def __init__(self, channels: int, cond_channels: int, hidden_channels: int, clamp: float, level: int,
                 blocks: int = 0, attention_size: tuple | None = None):
        super().__init__()
        self.channels, self.half, self.clamp, self.level = channels, channels // 2, float(clamp), level
        # the measurement enters through a 1x1 conv added to the 3x3 conv of z_a: its features already
        # carry spatial context from the encoder, and a 3x3 over them would be most of the flow's compute
        self.in_z = nn.Conv2d(self.half, hidden_channels, 3, padding=1)
        self.in_c = nn.Conv2d(cond_channels, hidden_channels, 1, bias=False)
        out = nn.Conv2d(hidden_channels, 2 * (channels - self.half), 3, padding=1)
        if not blocks and attention_size is None:
            self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden_channels, hidden_channels, 1), nn.ReLU(), out)
        else:
            middle = [ResidualConvBlock(hidden_channels) for _ in range(blocks)]
            if attention_size is not None:
                middle.append(SpatialSelfAttention(hidden_channels, attention_size))
            self.net = nn.Sequential(*middle, nn.ReLU(), out)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, z_a, context):
        h = self.in_z(z_a)  # (B * n, hidden, h, w)
        c = self.in_c(context[self.level])  # (B, hidden, h, w), B dividing B * n
        if c.shape[0] != h.shape[0]:
            # n samples per measurement (rows i*n .. i*n + n - 1 share y_i): broadcast instead of repeating
            h = (h.unflatten(0, (c.shape[0], -1)) + c[:, None]).flatten(0, 1)
        else:
            h = h + c
        h = self.net(h)
        # the affine update and log-det in the stream's dtype, even when the network ran in bf16
        raw, t = h.to(z_a.dtype).chunk(2, 1)
        return self.clamp * torch.tanh(raw / self.clamp), t

    def forward(self, z, context=None):
        n, k = self.channels, self.half
        z_a, z_b = z[:, :k], z[:, k:n]
        s, t = self._scale_shift(z_a, context)
        x_b = z_b * s.exp() + t
        return torch.cat([z_a, x_b, z[:, n:]], 1), s.flatten(1).sum(1)

    def inverse(self, x, context=None):
        n, k = self.channels, self.half
        x_a, x_b = x[:, :k], x[:, k:n]
        s, t = self._scale_shift(x_a, context)
        z_b = (x_b - t) * (-s).exp()
        return torch.cat([x_a, z_b, x[:, n:]], 1), -s.flatten(1).sum(1)


class ResidualConvBlock(nn.Module):
    """h + conv1x1(ReLU(conv3x3(ReLU(h)))): (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(channels, channels, 1))

    def forward(self, h):
        return h + self.net(h)


class SpatialSelfAttention(nn.Module):
    """h + MHA(LN(h + pos)) over the h * w positions of a feature map, then h + MLP(LN(h)) (a pre-LN transformer layer).

    A coupling network's view is otherwise a few convs wide; at the coarse levels (4x4, 8x8 of a 32x32
    image: 16 or 64 positions) attention over all positions is cheap. Heads: gcd(C, 4).

    Args:
        channels: C.
        size: (h, w), for the learned position embedding.
    Shapes: (B, C, h, w) -> (B, C, h, w).
    """

    def __init__(self, channels: int, size: tuple):
        super().__init__()
        self.heads = math.gcd(channels, 4)
        self.pos = nn.Parameter(torch.zeros(size[0] * size[1], channels))
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, h):
        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)  # (B, T, C), T = h * w
        q, k, v = self.qkv(self.norm1(t + self.pos)).unflatten(2, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, C / heads)
        t = t + self.proj(a.transpose(1, 2).flatten(2))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, hh, ww)


class ConditionalPixelAffine(Flow):
    """x = z * exp(s) + t per pixel, with (t, s) images of the measurement: `context[index]` = (t, s).

    The last layer of a class-conditional image flow (sampling direction): t and s are a learned image
    and log-scale per class, so q(x | c) is "a template of the class plus a learned, class-dependent
    spread times what the Glow makes". Started at the class's mean and std of the training images,
    the flow is N(mean_c, diag std_c^2) at step 0 (the couplings start as the identity and the 1x1
    convs are rotations), a pseudo-inverse of the classifier that a label alone cannot give the
    couplings quickly. log|det| = sum s.

    Args:
        index: which item of the context tuple holds (t, s), each (B', C, H, W) with B' dividing z's batch
            (z's rows i*n .. i*n + n - 1 belong to context row i).
    Shapes: z (B, C, H, W) -> x (B, C, H, W), log_det (B,).
    """

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def _affine(self, v, context, sign: float):
        """x = z exp(s) + t (sign 1) or z = (x - t) exp(-s) (sign -1); t, s broadcast over the n samples of each y."""
        t, s = (c.to(v.dtype)[:, None] for c in context[self.index])  # (B', 1, C, H, W)
        v = v.unflatten(0, (t.shape[0], -1))  # (B', n, C, H, W)
        out = v * s.exp() + t if sign > 0 else (v - t) * (-s).exp()
        log_det = sign * s.flatten(2).sum(2).expand(-1, v.shape[1])  # (B', n)
        return out.flatten(0, 1), log_det.flatten()

    def forward(self, z, context=None):
        return self._affine(z, context, 1.0)

    def inverse(self, x, context=None):
        return self._affine(x, context, -1.0)
