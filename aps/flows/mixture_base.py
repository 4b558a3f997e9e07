"""A conditional Gaussian-mixture base q0(z | y) for the vector flow, with its stratified sampler.

    q0(z | y) = sum_k w_k(y) N(z; mu_k(y), diag s_k(y)^2),    (logits, mu, log s) = MLP(context)

With a multimodal base the flow can put whole base components on posterior modes instead of tearing
one Gaussian apart: a mode-coverage lever against reverse KL's mode seeking (DESIGN.md).

Reverse-KL gradients w.r.t. the weights w need the stratified estimator (Morningstar et al. 2021,
"Automatic Differentiation Variational Inference with Mixtures"): m reparametrised draws from EVERY
component, each weighted by w_k / m,

    E_q[f(x)] = sum_k w_k(y) E_{z ~ N_k}[f(G(z; y))]  ~=  sum_k sum_{j < m} (w_k(y) / m) f(G(z_kj; y)),

an unbiased estimate whose weights carry the gradient to w. Plain ancestral sampling (k ~ Cat(w),
then z) draws i.i.d. samples of q but gives no gradient to w. log q0 is always the full mixture
density (logsumexp over the components), so log q(x | y) = log q0(z | y) - log|det dG/dz| is exact.
"""
from __future__ import annotations

import math

import normflows as nf
import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)
LOG_SCALE_BOUND = 6.0  # soft bound on |log s|: s in (e^-6, e^6), far from anything a unit-scale frame needs


class ConditionalGaussianMixture(nf.distributions.BaseDistribution):
    """q0(z | context) = sum_k w_k N(z; mu_k, diag s_k^2), its K weights, means and scales from an MLP.

    A normflows base distribution with context, so `nf.ConditionalNormalizingFlow` uses it as q0:
    `forward(num_samples, context)` draws one z per context row (ancestral), `log_prob(z, context)`.

    Args:
        d: dimension of z. context_dim: dimension of the context (the standardised y).
        n_components: K. hidden: width of the MLP's two hidden layers.
    The MLP's last layer starts at zero, so q0 starts independent of y: its bias holds the initial
    logits (0: uniform weights), means and log-scales (set by `fit`; before that, means ~ N(0, 2^2 I)
    and s = 1).
    Shapes: context (B, context_dim) -> logits (B, K), mu (B, K, d), log_s (B, K, d).
    """

    def __init__(self, d: int, context_dim: int, n_components: int, hidden: int = 64):
        super().__init__()
        self.d, self.n_components = d, n_components
        k = n_components
        self.net = nn.Sequential(nn.Linear(context_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, k * (1 + 2 * d)))
        nn.init.zeros_(self.net[-1].weight)
        with torch.no_grad():
            self._set_bias(torch.zeros(k), 2.0 * torch.randn(k, d), torch.zeros(k, d))

    def _set_bias(self, logits, mu, log_s):
        raw_log_s = LOG_SCALE_BOUND * torch.atanh(log_s / LOG_SCALE_BOUND)  # inverse of the soft bound in params
        self.net[-1].bias.copy_(torch.cat([logits, mu.flatten(), raw_log_s.flatten()]))

    def params(self, context: torch.Tensor):
        """(log w (B, K), mu (B, K, d), log s (B, K, d)) for a context (B, context_dim)."""
        k, d = self.n_components, self.d
        out = self.net(context)
        logits, mu, raw_log_s = out.split([k, k * d, k * d], dim=-1)
        log_s = LOG_SCALE_BOUND * torch.tanh(raw_log_s / LOG_SCALE_BOUND)
        return torch.log_softmax(logits, -1), mu.unflatten(-1, (k, d)), log_s.unflatten(-1, (k, d))

    def log_prob(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """log q0(z | context) = logsumexp_k [log w_k + log N(z; mu_k, s_k^2)]: z (B, d), context (B, .) -> (B,)."""
        log_w, mu, log_s = self.params(context)
        log_n = -0.5 * (((z[:, None, :] - mu) * torch.exp(-log_s)).pow(2) + 2 * log_s + LOG_2PI).sum(-1)  # (B, K)
        return torch.logsumexp(log_w + log_n, dim=-1)

    def sample_ancestral(self, context: torch.Tensor, n: int, generator: torch.Generator | None = None):
        """n i.i.d. draws of q0(z | context_i) per row: k ~ Cat(w), z = mu_k + s_k eps -> (B * n, d).

        The noise is drawn on the generator's device (the seeded CPU generator of aps.sampling) and moved;
        rows i*n .. i*n + n - 1 belong to context row i.
        """
        log_w, mu, log_s = self.params(context)
        b, dev = context.shape[0], context.device
        gen_dev = generator.device if generator is not None else dev
        u = torch.rand(b, n, 1, generator=generator, device=gen_dev, dtype=mu.dtype).to(dev)
        eps = torch.randn(b, n, self.d, generator=generator, device=gen_dev, dtype=mu.dtype).to(dev)
        cdf = torch.cumsum(log_w.exp(), -1)  # (B, K)
        k = (u > cdf[:, None, :-1]).sum(-1)  # (B, n): inverse-CDF draw of the component
        rows = torch.arange(b, device=dev)[:, None]
        z = mu[rows, k] + torch.exp(log_s[rows, k]) * eps  # (B, n, d)
        return z.flatten(0, 1)

    def sample_stratified(self, context: torch.Tensor, m: int, generator: torch.Generator | None = None):
        """m reparametrised draws from every component: z (B, K * m, d) and weights w_k / m (B, K * m).

        sum_j weight_ij f(z_ij) is an unbiased estimate of E_{q0(.|context_i)}[f]; the weights sum to 1
        per row and are differentiable w.r.t. the logits. Column k * m + j is draw j of component k.
        """
        log_w, mu, log_s = self.params(context)
        b, k = log_w.shape
        eps = torch.randn(b, k, m, self.d, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu[:, :, None] + torch.exp(log_s)[:, :, None] * eps  # (B, K, m, d)
        weight = (log_w.exp() / m)[:, :, None].expand(b, k, m)
        return z.flatten(1, 2), weight.flatten(1)

    def forward(self, num_samples: int = 1, context: torch.Tensor | None = None):
        """normflows' q0 call: one z per context row (num_samples == len(context)) -> z (B, d), log q0 (B,)."""
        if context is None or context.shape[0] != num_samples:
            raise ValueError("ConditionalGaussianMixture draws one z per context row: pass num_samples == len(context)")
        z = self.sample_ancestral(context, 1)
        return z, self.log_prob(z, context)

    @torch.no_grad()
    def fit(self, u: torch.Tensor, iters: int = 25, min_scale: float = 0.05,
            generator: torch.Generator | None = None) -> None:
        """Spread the components over samples u (N, d) of where the flow's latents should go: k-means.

        The means become the k-means centres (k-means++ seeding, Arthur & Vassilvitskii 2007), the
        scales each cluster's per-axis spread (at least min_scale), the weights uniform. The samples
        should come from the prior and the operator only (e.g. prior draws mapped through the flow's
        frame for their own measurement), never from a prior's hidden structure.
        """
        u = u.detach().to(self.net[-1].bias)
        n, k = len(u), self.n_components
        centres = u[torch.randint(n, (1,), generator=generator, device=u.device)]
        for _ in range(1, k):  # k-means++: the next centre with probability ~ squared distance to the nearest
            d2 = torch.cdist(u, centres).min(1).values.pow(2)
            centres = torch.cat([centres, u[torch.multinomial(d2 / d2.sum(), 1, generator=generator)]])
        for _ in range(iters):  # Lloyd; an empty cluster keeps its centre
            assign = torch.cdist(u, centres).argmin(1)
            for j in range(k):
                members = u[assign == j]
                if len(members):
                    centres[j] = members.mean(0)
        assign = torch.cdist(u, centres).argmin(1)
        scales = torch.stack([u[assign == j].std(0) if (assign == j).sum() > 1 else torch.ones(self.d, device=u.device)
                              for j in range(k)])
        log_s = scales.clamp_min(min_scale).log().clamp(max=LOG_SCALE_BOUND - 0.1)
        self._set_bias(torch.zeros(k), centres, log_s)
