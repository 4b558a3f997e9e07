"""A conditional flow for vectors: rational-quadratic spline couplings on a linear-Gaussian frame.

Layers, in the sampling direction z -> x (normflows' forward):

    z ~ q0(z | y)  ->  [spline coupling(context = y) -> permutation] x n_layers  ->  u
    u  ->  x = m(y) + L u                         (GaussianFrame: fixed, from the moments)

q0 is N(0, I), or with base_components = K > 1 a conditional K-component Gaussian mixture
(aps.flows.mixture_base), a mode-coverage lever whose weights the objective trains by stratified
sampling (`sample_weighted`); base_gate adds its Gaussian gate on y and means linear in y.

The last layer is the exact posterior of a Gaussian with the prior's mean and covariance under the
linear operator (mean m(y) linear in y, covariance L L^T). It puts the flow's working space u where
the posterior has unit scale in every direction: narrow along A's rows, broad elsewhere
(without it, at d = 20 the flow's error sat inside the mode: docs/flows.md). The splines
(Durkan et al. 2019, "Neural Spline Flows") then only warp a unit-scale density into the multimodal
one; they contract as well as expand, unlike normflows' sigmoid affine coupling.
"""
from __future__ import annotations

import normflows as nf
import torch

from .base import ConditionalFlow
from .mixture_base import ConditionalGaussianMixture


class GaussianFrame(nf.flows.Flow):
    """x = M y + b + L u (forward, z -> x direction) with fixed M (d, dy), b (d,), lower-triangular L (d, d).

    The context is y standardised as (y - y_mean) / y_scale (its first dy columns; Fourier features of it
    may follow); this layer undoes that itself.
    """

    def __init__(self, d: int, dy: int):
        super().__init__()
        self.register_buffer("M", torch.zeros(d, dy))
        self.register_buffer("b", torch.zeros(d))
        self.register_buffer("L", torch.eye(d))
        self.register_buffer("y_mean", torch.zeros(dy))
        self.register_buffer("y_scale", torch.ones(dy))

    def _mean(self, context):
        y_std = context[..., : self.M.shape[1]]
        return (y_std * self.y_scale + self.y_mean) @ self.M.T + self.b

    def _log_det(self, n, like):
        return torch.log(torch.diagonal(self.L)).sum().expand(n).to(like.dtype)

    def forward(self, z, context=None):
        return self._mean(context) + z @ self.L.T, self._log_det(len(z), z)

    def inverse(self, x, context=None):
        u = torch.linalg.solve_triangular(self.L, (x - self._mean(context)).T, upper=False).T
        return u, -self._log_det(len(x), x)

    @torch.no_grad()
    def fit(self, prior_mean, prior_cov, A=None, sigma_y=None, scale_cov=None, gain=None):
        """Set the frame to the Gaussian posterior N(m(y), S) of N(prior_mean, prior_cov) under y = A x + sigma_y n.

        Without A (a nonlinear operator), the frame is the prior's moments alone: x = mean + chol(cov) u.
        `scale_cov`, if given, replaces S as the frame's scale L L^T (e.g. the width of one mixture
        component's posterior, so that separate modes land several units apart in u). `gain` (d, dy), if
        given, replaces the moments' gain C A^T G^-1 as M, with b = prior_mean - gain A prior_mean: with one
        mixture component's gain and covariance (frame "conditioned") every component's posterior is a unit
        Gaussian in u whose mean does not move with y. y is standardised by the moments either way.
        """
        m, c = prior_mean.double(), prior_cov.double()
        if A is None:
            self.b.copy_(m)
            self.L.copy_(torch.linalg.cholesky(c if scale_cov is None else scale_cov.double()))
            return
        a = A.double()
        gram = a @ c @ a.T + sigma_y ** 2 * torch.eye(a.shape[0], dtype=torch.float64)
        moments_gain = torch.linalg.solve(gram, a @ c).T  # C A^T G^-1, (d, dy)
        cov = c - moments_gain @ a @ c
        gain = moments_gain if gain is None else gain.double()
        self.M.copy_(gain)
        self.b.copy_(m - gain @ (a @ m))
        cov = cov if scale_cov is None else scale_cov.double()
        self.L.copy_(torch.linalg.cholesky(0.5 * (cov + cov.T)))
        self.y_mean.copy_(a @ m)
        self.y_scale.copy_(torch.diagonal(gram).sqrt())


class ConditionalVectorFlow(ConditionalFlow):
    """q_phi(x | y) for x in R^d and y in R^dy (Durkan et al. 2019 couplings, conditioned on y).

    Args:
        d, dy: dimensions of x and y. n_layers: spline couplings. hidden: width of each coupling's
        residual net (num_blocks residual blocks). bins: spline bins. tail_bound: the splines act on
        [-B, B] in the frame's unit-scale space and are linear outside. base_components: K > 1 makes
        the base a conditional K-component Gaussian mixture (0 or 1: N(0, I)); base_hidden: the width
        of its MLP; base_gate: its Gaussian gate on y; base_cov: the gated base's "full" or "diag" component
        covariances (aps.flows.mixture_base). n_layers may be 0: the base and the frame alone. fourier: F > 0 appends sin and cos of F random projections of the standardised y
        (frequencies ~ N(0, fourier_scale^2), fixed, saved with the weights) to the context, so the
        couplings and the base can change quickly with y (posterior mode weights switch on the scale of
        sigma_y, far below y's spread; Tancik et al. 2020, "Fourier Features Let Networks Learn High
        Frequency Functions").
    """

    def __init__(self, d: int, dy: int, n_layers: int = 8, hidden: int = 128, num_blocks: int = 2,
                 bins: int = 16, tail_bound: float = 5.0, base_components: int = 0, base_hidden: int = 64,
                 fourier: int = 0, fourier_scale: float = 10.0, base_gate: bool = False, base_cov: str = "full"):
        super().__init__()
        self.args = dict(d=d, dy=dy, n_layers=n_layers, hidden=hidden, num_blocks=num_blocks,
                         bins=bins, tail_bound=tail_bound, base_components=base_components, base_hidden=base_hidden)
        if fourier:  # only recorded when used, so older checkpoints' configs stay as they were
            self.args.update(fourier=fourier, fourier_scale=fourier_scale)
            g = torch.Generator().manual_seed(0)
            self.register_buffer("freqs", torch.randn(fourier, dy, generator=g) * fourier_scale)
        else:
            self.freqs = None
        if base_gate:
            if base_components < 2:
                raise ValueError("base_gate needs a mixture base (base_components >= 2)")
            self.args.update(base_gate=True)
        if base_cov != "full":
            if not base_gate:
                raise ValueError("base_cov applies to the gated mixture base (base_gate)")
            self.args.update(base_cov=base_cov)
        context_dim = dy + 2 * fourier
        self.event_shape, self.y_shape = (d,), (dy,)
        layers = []
        for i in range(n_layers):
            layers.append(nf.flows.CoupledRationalQuadraticSpline(
                d, num_blocks, hidden, num_context_channels=context_dim, num_bins=bins, tail_bound=tail_bound,
                reverse_mask=bool(i % 2)))
            if d > 2:  # alternating masks already mix both halves when d == 2
                layers.append(nf.flows.Permute(d, mode="shuffle"))
        layers.append(GaussianFrame(d, dy))
        if base_components > 1:
            q0 = ConditionalGaussianMixture(d, context_dim, base_components, base_hidden, gate_dim=dy if base_gate else 0,
                                            cov=base_cov)
        else:
            q0 = nf.distributions.DiagGaussian(d, trainable=False)
        self.nf = nf.ConditionalNormalizingFlow(q0, layers)

    @property
    def frame(self) -> GaussianFrame:
        return self.nf.flows[-1]

    @property
    def mixture_base(self) -> ConditionalGaussianMixture | None:
        """The conditional mixture base q0(z | y), or None for the standard normal."""
        return self.nf.q0 if isinstance(self.nf.q0, ConditionalGaussianMixture) else None

    @property
    def standard_normal_base(self) -> bool:
        return self.mixture_base is None

    def base_log_prob(self, z, context):
        if self.mixture_base is None:
            return super().base_log_prob(z, context)
        return self.mixture_base.log_prob(z, context)

    def sample_z(self, y, n, generator=None):
        if self.mixture_base is None:
            return super().sample_z(y, n, generator)
        return self.mixture_base.sample_ancestral(self.encode(y), n, generator)

    def sample_weighted(self, y, n, generator=None):
        """As `ConditionalFlow.sample_weighted`; with a mixture base, stratified: m = ceil(n / K) draws from
        each of the K components, weights w_k(y) / m, so n' = K * m samples per y."""
        base = self.mixture_base
        if base is None:
            return super().sample_weighted(y, n, generator)
        b, m = y.shape[0], -(-n // base.n_components)
        context = self.encode(y)
        params = base.params(context)
        z, weight = base.sample_stratified(context, m, generator, params=params)  # (B, K * m, d), (B, K * m)
        if base._mixing() is not None:
            x, log_q = self(z.flatten(0, 1), y)
        else:  # diagonal components: log q0 from the params per y (the flow's forward would redo them per z)
            n_per = z.shape[1]
            x, log_det = self.nf.forward_and_log_det(z.flatten(0, 1), context=context.repeat_interleave(n_per, 0))
            log_q = base.log_prob_grouped(z, params).flatten() - log_det
        return x.reshape(b, -1, *self.event_shape), log_q.reshape(b, -1), weight

    @torch.no_grad()
    def fit_base(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Spread the mixture base's components over data pairs x (N, d), y (N, dy) seen in the latent space.

        Each x goes back through the flow for its own measurement (the frame, u = L^-1 (x - m(y)), then the
        couplings as they are now): the latents z that the flow maps to x. A gated base clusters the joint
        (z, standardised y). A no-op without a mixture base.
        """
        if self.mixture_base is not None:
            context = self.encode(y).to(self.frame.L.dtype)
            z, _ = self.nf.inverse_and_log_det(x.to(self.frame.L.dtype), context=context)
            self.mixture_base.fit(z, y=context[:, : self.y_shape[0]], generator=generator)

    def encode(self, y):
        y_std = (y - self.frame.y_mean) / self.frame.y_scale
        if self.freqs is None:
            return y_std
        proj = y_std @ self.freqs.T
        return torch.cat([y_std, torch.sin(proj), torch.cos(proj)], -1)

    def config(self):
        return {"type": "vector", **self.args}
