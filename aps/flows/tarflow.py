"""ConditionalTarFlowBlock: an affine autoregressive flow over patch tokens, made by a causal transformer.

TarFlow (Zhai et al. 2024, "Normalizing Flows are Capable Generative Models"), conditioned on the
measurement. The image at one resolution, (D, h, w), is read as T = h * w tokens of D values (a pixel
of an image squeezed s times is a 2^s x 2^s patch of the original). With (mu_t, alpha_t) computed
from the tokens before t and from y,

    sampling (z -> x):  x_t = mu_t + exp(alpha_t) * z_t,     (mu_t, alpha_t) = f(x_<t, y)
    density  (x -> z):  z_t = (x_t - mu_t) * exp(-alpha_t)

and log|det dx/dz| = sum_t sum_d alpha_t,d: the Jacobian is block-triangular with diagonal exp(alpha).
The density direction is one causal transformer pass over all tokens; sampling is sequential over the
T tokens, with a key/value cache so each of the T steps runs the transformer on one new token. Keep T
small (16 at the coarsest level of a 32x32 image with three levels).

alpha is soft-clamped to (-clamp, clamp) as in the couplings, and the last linear layer is zero-initialised,
so a block starts as the identity. Successive blocks read the tokens in alternating order (TarFlow's
permutation), so that every token is conditioned on every other one in some block.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from normflows.flows import Flow
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, over a whole sequence or one token at a time with a key/value cache.

    Shapes: h (B, T, W) -> (B, T, W); with `cache` (a list, empty at the first token), h is (B, 1, W),
    the cache grows by its keys and values, and the token attends to itself and all tokens before it.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h, cache: list | None = None):
        q, k, v = self.qkv(h).unflatten(2, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (B, heads, T, W / heads)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
            a = F.scaled_dot_product_attention(q, k, v)  # the one query is the newest token: causal as it stands
        return self.proj(a.transpose(1, 2).flatten(2))


class TransformerLayer(nn.Module):
    """Pre-LN transformer layer: h + attn(LN(h)), then h + MLP(LN(h)) (MLP 4x wide). Shapes as `CausalSelfAttention`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h, cache: list | None = None):
        h = h + self.attn(self.norm1(h), cache)
        return h + self.mlp(self.norm2(h))


class ConditionalTarFlowBlock(Flow):
    """One TarFlow block on the first `channels` channels of z (B, >= D, h, w), conditioned on `context[level]`.

    Args:
        channels: D, the values per token (the channels of the tensor at this resolution it transforms).
        cond_channels: channels of the context map `context[level]` (B', cond_channels, h, w), B' dividing z's
            batch (z's rows i*n .. i*n + n - 1 belong to context row i).
        size: (h, w); T = h * w tokens.
        width: transformer width (heads: gcd(width, 4)).
        layers: transformer layers.
        clamp: bound on |alpha|.
        level: which item of the context tuple this block reads.
        reverse: read the tokens in reverse raster order.
    Shapes: z (B, >= D, h, w) -> x (B, >= D, h, w), log_det (B,).
    """

    def __init__(self, channels: int, cond_channels: int, size: tuple, width: int, layers: int, clamp: float,
                 level: int, reverse: bool = False):
        super().__init__()
        self.channels, self.clamp, self.level, self.reverse = channels, float(clamp), level, reverse
        self.tokens = size[0] * size[1]
        self.embed = nn.Linear(channels, width)
        self.start = nn.Parameter(torch.zeros(width))  # the input in place of "the token before the first"
        self.pos = nn.Parameter(0.02 * torch.randn(self.tokens, width))
        self.cond = nn.Linear(cond_channels, width)
        heads = math.gcd(width, 4)
        self.layers = nn.ModuleList(TransformerLayer(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2 * channels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _to_tokens(self, v):
        """(B, K, h, w) -> (B, T, K) in this block's order."""
        t = v.flatten(2).transpose(1, 2)
        return t.flip(1) if self.reverse else t

    def _to_image(self, t, like):
        """(B, T, D) in this block's order -> like's layout, with like's channels behind the first D."""
        t = t.flip(1) if self.reverse else t
        v = t.transpose(1, 2).reshape(like.shape[0], self.channels, *like.shape[2:])
        return torch.cat([v, like[:, self.channels:]], 1) if like.shape[1] > self.channels else v

    def _condition(self, context, b: int):
        """Per-token conditioning (B, T, width): the measurement's features at token t plus t's position embedding."""
        c = self.cond(self._to_tokens(context[self.level])) + self.pos  # (B', T, width)
        if c.shape[0] != b:  # n samples per measurement: rows i*n .. i*n + n - 1 share y_i
            c = c[:, None].expand(-1, b // c.shape[0], -1, -1).flatten(0, 1)
        return c

    def _params(self, h, dtype):
        """(alpha, mu) in the stream's dtype from transformer outputs h (B, T', width)."""
        raw, mu = self.head(self.norm(h)).to(dtype).chunk(2, -1)
        return self.clamp * torch.tanh(raw / self.clamp), mu

    def inverse(self, x, context=None):
        x_t = self._to_tokens(x[:, : self.channels])  # (B, T, D)
        b = x_t.shape[0]
        # input at position t: token t - 1 (the start vector at t = 0) plus the conditioning of position t
        h = torch.cat([self.start.expand(b, 1, -1).to(x_t.dtype), self.embed(x_t[:, :-1])], 1)
        h = h + self._condition(context, b)
        for layer in self.layers:
            h = layer(h)
        alpha, mu = self._params(h, x_t.dtype)
        z_t = (x_t - mu) * (-alpha).exp()
        return self._to_image(z_t, x), -alpha.flatten(1).sum(1)

    def forward(self, z, context=None):
        z_t = self._to_tokens(z[:, : self.channels])  # (B, T, D)
        b = z_t.shape[0]
        c = self._condition(context, b)
        caches = [[] for _ in self.layers]
        h_in = self.start.expand(b, 1, -1).to(z_t.dtype)
        xs, log_det = [], 0.0
        for t in range(self.tokens):  # sequential: token t needs x_<t
            h = h_in + c[:, t:t + 1]
            for layer, cache in zip(self.layers, caches):
                h = layer(h, cache)
            alpha, mu = self._params(h, z_t.dtype)  # (B, 1, D)
            x = mu + alpha.exp() * z_t[:, t:t + 1]
            xs.append(x)
            log_det = log_det + alpha.flatten(1).sum(1)
            h_in = self.embed(x)
        return self._to_image(torch.cat(xs, 1), z), log_det
