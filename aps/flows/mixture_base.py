"""A conditional Gaussian-mixture base q0(z | y) for the vector flow, with its stratified sampler.

    q0(z | y) = sum_k w_k(y) N(z; mu_k(y), diag s_k(y)^2),    (logits, mu, log s) = MLP(context)

With a multimodal base the flow can put whole base components on posterior modes instead of tearing
one Gaussian apart: a mode-coverage lever against reverse KL's mode seeking (docs/objective.md, docs/flows.md).

Optionally (`gate_dim` = dy > 0) the weights and means also get the form of Gaussian mixture regression
(a mixture of linear experts with a Gaussian gate; Jacobs et al. 1991, Ghahramani & Jordan 1994):

    log w_k(y) = log_softmax_k( b_k - 1/2 ||(y - c_k) / tau_k||^2 + MLP_k ),    mu_k(y) = m_k + D_k y + MLP_k,
    z = mu_k(y) + (I + N_k) (s_k(y) * eps),   N_k strictly lower-triangular (a full covariance per component)

with y the standardised measurement. This is the conditional of a joint Gaussian mixture over (z, y), so
the gate can switch a component on and off within a small range of y (a posterior's mode weights move
on the scale of the noise, sigma_y, far below y's spread), which an MLP started at zero learns slowly.
`fit` starts it from a Gaussian mixture fitted by EM to joint samples (u, y) (k-means, then EM;
Dempster et al. 1977), on prior draws and their measurements alone, and conditions it on y.

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
        d: dimension of z. context_dim: dimension of the context (the standardised y, then any features).
        n_components: K. hidden: width of the MLP's two hidden layers.
        gate_dim: dy > 0 adds the Gaussian gate and the linear means on the context's first dy columns
            (the standardised y); 0: the MLP alone.
    The MLP's last layer starts at zero, so q0 starts independent of y: its bias holds the initial
    logits (0: uniform weights), means and log-scales (set by `fit`; before that, means ~ N(0, 2^2 I)
    and s = 1). The gate starts flat (tau = 100) and the slopes D at zero.
    Shapes: context (B, context_dim) -> logits (B, K), mu (B, K, d), log_s (B, K, d).
    """

    def __init__(self, d: int, context_dim: int, n_components: int, hidden: int = 64, gate_dim: int = 0):
        super().__init__()
        self.d, self.n_components, self.gate_dim = d, n_components, gate_dim
        k = n_components
        self.net = nn.Sequential(nn.Linear(context_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, k * (1 + 2 * d)))
        nn.init.zeros_(self.net[-1].weight)
        if gate_dim:
            self.gate_centre = nn.Parameter(torch.zeros(k, gate_dim))  # c_k
            self.gate_log_width = nn.Parameter(torch.full((k, gate_dim), math.log(100.0)))  # log tau_k
            self.slope = nn.Parameter(torch.zeros(k, d, gate_dim))  # D_k
            self.mix = nn.Parameter(torch.zeros(k, d, d))  # N_k: its strictly lower triangle is used
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
        mu = mu.unflatten(-1, (k, d))
        log_s = LOG_SCALE_BOUND * torch.tanh(raw_log_s / LOG_SCALE_BOUND)
        if self.gate_dim:
            y = context[:, : self.gate_dim]  # (B, dy), the standardised measurement
            r = (y[:, None, :] - self.gate_centre) * torch.exp(-self.gate_log_width)  # (B, K, dy)
            logits = logits - 0.5 * r.pow(2).sum(-1)
            mu = mu + torch.einsum("kdj,bj->bkd", self.slope, y)
        return torch.log_softmax(logits, -1), mu, log_s.unflatten(-1, (k, d))

    def _mixing(self):
        """I + N_k (K, d, d), unit lower-triangular (log-det 0), or None for diagonal components."""
        if not self.gate_dim:
            return None
        return torch.tril(self.mix, -1) + torch.eye(self.d, dtype=self.mix.dtype, device=self.mix.device)

    @staticmethod
    def _mix_into(mix, v):
        """(I + N) v with matching leading dims (mix (..., d, d), v (..., d)); v itself for diagonal components."""
        return v if mix is None else torch.einsum("...de,...e->...d", mix, v)

    def log_prob(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """log q0(z | context) = logsumexp_k [log w_k + log N(z; mu_k, Sigma_k)]: z (B, d), context (B, .) -> (B,)."""
        log_w, mu, log_s = self.params(context)
        v = z[:, None, :] - mu  # (B, K, d)
        mix = self._mixing()
        if mix is not None:  # undo the unit lower-triangular mixing: solve (I + N_k) w = v
            v = torch.linalg.solve_triangular(mix, v[..., None], upper=False, unitriangular=True)[..., 0]
        log_n = -0.5 * ((v * torch.exp(-log_s)).pow(2) + 2 * log_s + LOG_2PI).sum(-1)  # (B, K)
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
        mix = self._mixing()
        v = self._mix_into(None if mix is None else mix[k], torch.exp(log_s[rows, k]) * eps)  # (B, n, d)
        return (mu[rows, k] + v).flatten(0, 1)

    def sample_stratified(self, context: torch.Tensor, m: int, generator: torch.Generator | None = None):
        """m reparametrised draws from every component: z (B, K * m, d) and weights w_k / m (B, K * m).

        sum_j weight_ij f(z_ij) is an unbiased estimate of E_{q0(.|context_i)}[f]; the weights sum to 1
        per row and are differentiable w.r.t. the logits. Column k * m + j is draw j of component k.
        """
        log_w, mu, log_s = self.params(context)
        b, k = log_w.shape
        eps = torch.randn(b, k, m, self.d, generator=generator, device=mu.device, dtype=mu.dtype)
        mix = self._mixing()
        v = self._mix_into(None if mix is None else mix[:, None], torch.exp(log_s)[:, :, None] * eps)  # (B, K, m, d)
        z = mu[:, :, None] + v
        weight = (log_w.exp() / m)[:, :, None].expand(b, k, m)
        return z.flatten(1, 2), weight.flatten(1)

    def forward(self, num_samples: int = 1, context: torch.Tensor | None = None):
        """normflows' q0 call: one z per context row (num_samples == len(context)) -> z (B, d), log q0 (B,)."""
        if context is None or context.shape[0] != num_samples:
            raise ValueError("ConditionalGaussianMixture draws one z per context row: pass num_samples == len(context)")
        z = self.sample_ancestral(context, 1)
        return z, self.log_prob(z, context)

    @torch.no_grad()
    def fit(self, u: torch.Tensor, y: torch.Tensor | None = None, iters: int = 25, min_scale: float = 0.05,
            em_iters: int = 100, generator: torch.Generator | None = None) -> None:
        """Spread the components over samples u (N, d) of where the flow's latents should go: k-means.

        The means become the k-means centres (k-means++ seeding, Arthur & Vassilvitskii 2007), the
        scales each cluster's per-axis spread (at least min_scale), the weights uniform. The samples
        should come from the prior and the operator only (e.g. prior draws mapped through the flow's
        frame for their own measurement), never from a prior's hidden structure.

        With the gate, give the standardised measurements y (N, dy) of the same draws: a Gaussian mixture
        is fitted to the joint (u, y) (k-means, then `em_iters` EM steps) and conditioned on y, component
        by component: gate N(y; c_j, diag tau_j^2) times its weight, mean m_j + D_j y with
        D_j = S_uy S_yy^-1, covariance S_uu - D_j S_yu as (I + N_j) diag(s_j^2) (I + N_j)^T.
        """
        u = u.detach().to(self.net[-1].bias)
        gated = self.gate_dim and y is not None
        points = torch.cat([u, y.detach().to(u)], 1) if gated else u
        k, d = self.n_components, self.d
        assign, seeds = _kmeans(points, k, iters, generator)
        if not gated:
            centres, scales = [], []
            for j in range(k):  # an empty cluster keeps its k-means centre
                uj = u[assign == j]
                centres.append(uj.mean(0) if len(uj) else seeds[j])
                scales.append(uj.std(0) if len(uj) > 1 else torch.ones(d, device=u.device))
            log_s = torch.stack(scales).clamp_min(min_scale).log().clamp(max=LOG_SCALE_BOUND - 0.1)
            self._set_bias(torch.zeros(k, dtype=u.dtype, device=u.device), torch.stack(centres), log_s)
            return
        log_pi, means, covs = _em(points.double(), assign, k, em_iters)
        s_uu, s_uy, s_yy = covs[:, :d, :d], covs[:, :d, d:], covs[:, d:, d:]
        slope = torch.linalg.solve(s_yy, s_uy.transpose(1, 2)).transpose(1, 2)  # D_j = S_uy S_yy^-1, (K, d, dy)
        cond = s_uu - slope @ s_uy.transpose(1, 2)  # (K, d, d)
        chol = torch.linalg.cholesky(0.5 * (cond + cond.transpose(1, 2)))
        scale = torch.diagonal(chol, dim1=1, dim2=2)  # (K, d): chol = (I + N) diag(s)
        gate_log_width = 0.5 * torch.diagonal(s_yy, dim1=1, dim2=2).log()
        self.gate_centre.copy_(means[:, d:])
        self.gate_log_width.copy_(gate_log_width)
        self.slope.copy_(slope)
        self.mix.copy_(chol / scale[:, None, :])
        log_s = scale.clamp_min(min_scale).log().clamp(max=LOG_SCALE_BOUND - 0.1)
        # w_j(y) proportional to pi_j N(y; c_j, diag tau_j^2): the normaliser is -sum log tau_j
        self._set_bias((log_pi - gate_log_width.sum(1)).to(u), (means[:, :d] - (slope @ means[:, d:, None])[..., 0]).to(u),
                       log_s.to(u))


def _em(points: torch.Tensor, assign: torch.Tensor, k: int, iters: int, reg: float = 1e-6):
    """A full-covariance Gaussian mixture fitted to points (N, p) by EM from hard labels (N,):
    log weights (K,), means (K, p), covariances (K, p, p). A component left with fewer than p + 1 points' worth
    of responsibility gets a unit covariance (and a tiny weight, so it barely counts until training moves it)."""
    n, p = points.shape
    eye = torch.eye(p, dtype=points.dtype, device=points.device)
    resp = torch.nn.functional.one_hot(assign, k).to(points)  # (N, K)
    for it in range(iters + 1):
        nk = resp.sum(0) + 1e-10  # M step
        means = (resp.T @ points) / nk[:, None]
        diff = points[None] - means[:, None]  # (K, N, p)
        covs = torch.einsum("kn,knp,knq->kpq", resp.T, diff, diff) / nk[:, None, None] + reg * eye
        empty = nk < p + 1
        covs[empty] = eye  # too few points for a covariance
        log_pi = torch.log(nk / n)
        if it == iters:
            break
        dist = torch.distributions.MultivariateNormal(means, covariance_matrix=covs)  # E step
        log_r = log_pi + dist.log_prob(points[:, None, :])  # (N, K)
        resp = torch.softmax(log_r, 1)
    return log_pi, means, covs


def _kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator | None):
    """Cluster labels (N,) and centres (k, p) of points (N, p): k-means++ seeding (Arthur & Vassilvitskii
    2007), then Lloyd."""
    n = len(points)
    centres = points[torch.randint(n, (1,), generator=generator, device=points.device)]
    for _ in range(1, k):  # the next centre with probability ~ squared distance to the nearest
        d2 = torch.cdist(points, centres).min(1).values.pow(2)
        centres = torch.cat([centres, points[torch.multinomial(d2 / d2.sum(), 1, generator=generator)]])
    for _ in range(iters):  # an empty cluster keeps its centre
        assign = torch.cdist(points, centres).argmin(1)
        for j in range(k):
            members = points[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    return torch.cdist(points, centres).argmin(1), centres
