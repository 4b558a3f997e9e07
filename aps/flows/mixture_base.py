"""A conditional Gaussian-mixture base q0(z | y) for the vector flow, with its stratified sampler.

    q0(z | y) = sum_k w_k(y) N(z; mu_k(y), diag s_k(y)^2),    (logits, mu, log s) = MLP(context)

With a multimodal base the flow can put whole base components on posterior modes instead of tearing
one Gaussian apart: a mode-coverage lever against reverse KL's mode seeking (docs/objective.md, docs/flows.md).

Optionally (`gate_dim` = dy > 0) the weights and means also get the form of Gaussian mixture regression
(a mixture of linear experts with a Gaussian gate; Jacobs et al. 1991, Ghahramani & Jordan 1994):

    log w_k(y) = log_softmax_k( b_k - 1/2 ||(y - c_k) / tau_k||^2 + MLP_k ),    mu_k(y) = m_k + D_k y + MLP_k,
    z = mu_k(y) + (I + N_k) (s_k(y) * eps),   N_k strictly lower-triangular (a full covariance per component)

with y the standardised measurement. `cov="diag"` keeps the components diagonal (no N_k: K d^2 numbers are
too many at d = 800) and gives the gate a full covariance on y instead, log w_k = b_k - 1/2 ||T_k (y - c_k)||^2
with T_k upper-triangular (diagonal 1 / tau_k): the conditional of a joint mixture whose components have
z and y independent, which is what a posterior frame leaves (aps.flows.vector, frame "conditioned").
This is the conditional of a joint Gaussian mixture over (z, y), so
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
KMEANS_POINTS = 16384  # the diag fit clusters this many draws (k-means is the costly part at d = 800), then runs EM on all
LOG_SCALE_BOUND = 6.0  # soft bound on |log s|: s in (e^-6, e^6), far from anything a unit-scale frame needs


class ConditionalGaussianMixture(nf.distributions.BaseDistribution):
    """q0(z | context) = sum_k w_k N(z; mu_k, diag s_k^2), its K weights, means and scales from an MLP.

    A normflows base distribution with context, so `nf.ConditionalNormalizingFlow` uses it as q0:
    `forward(num_samples, context)` draws one z per context row (ancestral), `log_prob(z, context)`.

    Args:
        d: dimension of z. context_dim: dimension of the context (the standardised y, then any features).
        n_components: K. hidden: width of the MLP's two hidden layers.
        gate_dim: dy > 0 adds the Gaussian gate and the linear means on the context's first dy columns
            (the standardised y); 0: the MLP alone. cov: with the gate, "full" component covariances
            (I + N_k) diag(s_k^2) (I + N_k)^T and a diagonal gate, or "diag" components and a full-covariance gate.
    The MLP's last layer starts at zero, so q0 starts independent of y: its bias holds the initial
    logits (0: uniform weights), means and log-scales (set by `fit`; before that, means ~ N(0, 2^2 I)
    and s = 1). The gate starts flat (tau = 100) and the slopes D at zero.
    Shapes: context (B, context_dim) -> logits (B, K), mu (B, K, d), log_s (B, K, d).
    """

    def __init__(self, d: int, context_dim: int, n_components: int, hidden: int = 64, gate_dim: int = 0,
                 cov: str = "full"):
        super().__init__()
        if cov not in ("full", "diag"):
            raise ValueError(f"cov must be full or diag, got {cov!r}")
        self.d, self.n_components, self.gate_dim, self.cov = d, n_components, gate_dim, cov
        k = n_components
        self.net = nn.Sequential(nn.Linear(context_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, k * (1 + 2 * d)))
        nn.init.zeros_(self.net[-1].weight)
        if gate_dim:
            self.gate_centre = nn.Parameter(torch.zeros(k, gate_dim))  # c_k
            self.gate_log_width = nn.Parameter(torch.full((k, gate_dim), math.log(100.0)))  # log tau_k
            self.slope = nn.Parameter(torch.zeros(k, d, gate_dim))  # D_k
            if cov == "full":
                self.mix = nn.Parameter(torch.zeros(k, d, d))  # N_k: its strictly lower triangle is used
            else:
                self.gate_mix = nn.Parameter(torch.zeros(k, gate_dim, gate_dim))  # T_k's strictly upper triangle
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
            v = y[:, None, :] - self.gate_centre  # (B, K, dy)
            r = v * torch.exp(-self.gate_log_width)
            if self.cov == "diag":  # r = T_k v, T_k = diag(1 / tau_k) + strictly upper(gate_mix_k)
                r = r + torch.einsum("kij,bkj->bki", torch.triu(self.gate_mix, 1), v)
            logits = logits - 0.5 * r.pow(2).sum(-1)
            mu = mu + torch.einsum("kdj,bj->bkd", self.slope, y)
        return torch.log_softmax(logits, -1), mu, log_s.unflatten(-1, (k, d))

    def _mixing(self):
        """I + N_k (K, d, d), unit lower-triangular (log-det 0), or None for diagonal components."""
        if not self.gate_dim or self.cov == "diag":
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

    def log_prob_grouped(self, z: torch.Tensor, params) -> torch.Tensor:
        """log q0(z_ij | context_i) for z (B, N, d) and `params(context)` of the B contexts, (B, N), for diagonal
        components (`_mixing()` None): the squared distances from matmuls, (B, N, K) work instead of (B, N, K, d),
        and the K-component parameters computed once per context rather than once per z."""
        log_w, mu, log_s = params
        inv_var = torch.exp(-2 * log_s)  # (B, K, d)
        quad = (torch.einsum("bnd,bkd->bnk", z.pow(2), inv_var) - 2 * torch.einsum("bnd,bkd->bnk", z, mu * inv_var)
                + (mu.pow(2) * inv_var).sum(-1)[:, None, :])
        log_n = -0.5 * quad.clamp_min(0) - log_s.sum(-1)[:, None, :] - 0.5 * self.d * LOG_2PI
        return torch.logsumexp(log_w[:, None, :] + log_n, dim=-1)

    def sample_stratified(self, context: torch.Tensor, m: int, generator: torch.Generator | None = None,
                          params=None):
        """m reparametrised draws from every component: z (B, K * m, d) and weights w_k / m (B, K * m).

        sum_j weight_ij f(z_ij) is an unbiased estimate of E_{q0(.|context_i)}[f]; the weights sum to 1
        per row and are differentiable w.r.t. the logits. Column k * m + j is draw j of component k.
        params: `params(context)` if already computed.
        """
        log_w, mu, log_s = self.params(context) if params is None else params
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
            em_iters: int = 100, generator: torch.Generator | None = None, restarts: int = 4) -> None:
        """Spread the components over samples u (N, d) of where the flow's latents should go: k-means.

        The means become the k-means centres (k-means++ seeding, Arthur & Vassilvitskii 2007), the
        scales each cluster's per-axis spread (at least min_scale), the weights uniform. The samples
        should come from the prior and the operator only (e.g. prior draws mapped through the flow's
        frame for their own measurement), never from a prior's hidden structure.

        With the gate, give the standardised measurements y (N, dy) of the same draws: a Gaussian mixture
        is fitted to the joint (u, y) (k-means, then `em_iters` EM steps) and conditioned on y, component
        by component: gate N(y; c_j, diag tau_j^2) times its weight, mean m_j + D_j y with
        D_j = S_uy S_yy^-1, covariance S_uu - D_j S_yu as (I + N_j) diag(s_j^2) (I + N_j)^T. The diag base
        keeps the best of `restarts` + 1 k-means runs (`_kmeans`: a run that merged two clusters would leave a
        component spread over both) and fits by `_em_block`.
        """
        u = u.detach().to(self.net[-1].bias)
        gated = self.gate_dim and y is not None
        points = torch.cat([u, y.detach().to(u)], 1) if gated else u
        k, d = self.n_components, self.d
        if gated and self.cov == "diag":  # k-means on at most KMEANS_POINTS of the draws, EM on all of them
            sub = points[:KMEANS_POINTS]
            _, centres = _kmeans(sub, k, iters, generator, restarts=restarts)
            self._fit_diag(points.double(), torch.cdist(points, centres).argmin(1), em_iters, min_scale, u)
            return
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


    def _fit_diag(self, points, assign, em_iters, min_scale, like):
        """The diag-cov fit: EM for a mixture over (z, y) with z and y independent in each component, z diagonal
        (one variance per axis pooled over the components: every estimate from all N draws, where a component's
        own n_j draws would leave it off by sqrt(2 / n_j) on each of d axes) and y full (`_em_block`); the gate
        T_j = chol(S_yy,j^-1)^T, the means and scales those of z, slopes 0. Training unties the scales."""
        d = self.d
        log_pi, means, z_var, s_yy = _em_block(points, assign, self.n_components, em_iters, d)
        chol = torch.linalg.cholesky(torch.linalg.inv(s_yy))  # S_yy^-1 = C C^T, T = C^T: ||T v||^2 = v^T S_yy^-1 v
        t = chol.transpose(1, 2)
        diag = torch.diagonal(t, dim1=1, dim2=2)
        self.gate_centre.copy_(means[:, d:])
        self.gate_log_width.copy_(-diag.log())
        self.gate_mix.copy_(t)  # its diagonal is not used (gate_log_width holds it)
        self.slope.zero_()
        log_s = (0.5 * z_var.log()).clamp(min=math.log(min_scale), max=LOG_SCALE_BOUND - 0.1)
        # w_j(y) proportional to pi_j N(y; c_j, S_yy,j): the normaliser is log det T_j = sum log diag T_j
        self._set_bias((log_pi + diag.log().sum(1)).to(like), means[:, :d].to(like), log_s.to(like))


def _em_block(points: torch.Tensor, assign: torch.Tensor, k: int, iters: int, d: int, reg: float = 1e-6,
              tol: float = 1e-9):
    """EM from hard labels (N,) for a mixture over points (N, d + q) = (z, y) whose components have z and y
    independent, z with a diagonal covariance shared by all components (tied) and y a full one: log weights (K,),
    means (K, d + q), z variances (K, d) (equal rows), y covariances (K, q, q). O(N K (d + q^2)) per step, for any d; stops when the mean log-likelihood
    moves by less than tol. A component with fewer than q + 2 points' worth of responsibility gets unit
    variances (and a tiny weight)."""
    n, p = points.shape
    q = p - d
    z, y = points[:, :d], points[:, d:]
    eye = torch.eye(q, dtype=points.dtype, device=points.device)
    resp = torch.nn.functional.one_hot(assign, k).to(points)  # (N, K)
    last = -math.inf
    for it in range(iters + 1):
        nk = resp.sum(0) + 1e-10  # M step
        means = (resp.T @ points) / nk[:, None]
        z_var = ((resp.T @ z.pow(2)) - nk[:, None] * means[:, :d].pow(2)).sum(0, keepdim=True).expand(k, d) / n
        dy_ = y[None] - means[:, None, d:]  # (K, N, q)
        s_yy = torch.einsum("kn,kni,knj->kij", resp.T, dy_, dy_) / nk[:, None, None] + reg * eye
        empty = nk < q + 2
        z_var = torch.where(empty[:, None], torch.ones_like(z_var), z_var.clamp_min(reg))
        s_yy[empty] = eye
        log_pi = torch.log(nk / n)
        if it == iters:
            break
        log_z = -0.5 * ((z.pow(2) @ (1 / z_var).T) - 2 * z @ (means[:, :d] / z_var).T
                        + (means[:, :d].pow(2) / z_var).sum(1) + z_var.log().sum(1) + d * LOG_2PI)  # (N, K)
        log_y = torch.distributions.MultivariateNormal(means[:, d:], covariance_matrix=s_yy).log_prob(y[:, None, :])
        log_r = log_pi + log_z + log_y
        total = torch.logsumexp(log_r, 1)
        resp = torch.exp(log_r - total[:, None])
        ll = float(total.mean())
        if abs(ll - last) < tol * max(1.0, abs(ll)):
            last = ll
            iters = it + 1  # one more M step with these responsibilities, then stop
            continue
        last = ll
    return log_pi, means, z_var, s_yy


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


def _kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator | None, restarts: int = 1):
    """Cluster labels (N,) and centres (k, p) of points (N, p): k-means++ seeding (Arthur & Vassilvitskii
    2007), then Lloyd. With restarts > 1: one more run seeded farthest-first (Gonzalez 1985: each next centre the
    point farthest from those chosen, which finds small far clusters that k-means++ rarely draws), and the run
    whose clusters, as diagonal Gaussians, give the points the highest likelihood (least within-cluster sum of
    squares would rather split a large cluster than separate two small ones)."""
    if restarts <= 1:
        return _kmeans_once(points, k, iters, generator)
    floor = 1e-4 * points.var(0)  # a variance floor per dimension: one-point clusters score finitely
    best = None
    for r in range(restarts + 1):
        assign, centres = _kmeans_once(points, k, iters, generator, farthest=r == 0)
        nk = torch.bincount(assign, minlength=k).to(points)
        var = torch.zeros_like(centres).index_add_(0, assign, (points - centres[assign]).pow(2)) / nk.clamp_min(1)[:, None]
        score = float((nk * torch.log(nk.clamp_min(1) / len(points))).sum()
                      - 0.5 * (nk[:, None] * torch.maximum(var, floor).log()).sum())
        if best is None or score > best[0]:
            best = (score, assign, centres)
    return best[1], best[2]


def _kmeans_once(points: torch.Tensor, k: int, iters: int, generator: torch.Generator | None, farthest: bool = False):
    n = len(points)
    centres = points[torch.randint(n, (1,), generator=generator, device=points.device)]
    for _ in range(1, k):  # the next centre with probability ~ squared distance to the nearest (or the farthest)
        d2 = torch.cdist(points, centres).min(1).values.pow(2)
        nxt = d2.argmax()[None] if farthest else torch.multinomial(d2 / d2.sum(), 1, generator=generator)
        centres = torch.cat([centres, points[nxt]])
    for _ in range(iters):  # an empty cluster keeps its centre
        assign = torch.cdist(points, centres).argmin(1)
        for j in range(k):
            members = points[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    return torch.cdist(points, centres).argmin(1), centres
