"""The exact Gaussian-mixture prior: every diffusion quantity in closed form.

p(x) = sum_k w_k N(x; mu_k, diag(v_k)). Under x_t = alpha x + sigma eps the noised density is again a
mixture, sum_k w_k N(x_t; alpha mu_k, diag(alpha^2 v_k + sigma^2)), so eps, the score and the
denoiser are exact at every t, and so is the posterior under a linear operator with Gaussian noise
(Bishop 2006, sec. 2.3.3, per component, with weights from the evidence N(y; A mu_k, A S_k A^T + s^2 I)).
This is what makes the mixture the ground truth for the whole pipeline (docs/priors.md).
"""
from __future__ import annotations

import math

import torch

from ..errors import ApsError
from ..schedules import ContinuousSchedule, Schedule
from .base import Prior, _expand

LOG_2PI = math.log(2 * math.pi)


class GaussianMixturePrior(Prior):
    """Mixture of K diagonal Gaussians in R^d.

    Args:
        means: (K, d). weights: (K,), positive (normalised here). variances: (K,) isotropic or (K, d).
        schedule: the VP schedule eps is evaluated on (default: continuous cosine, log-SNR in [-14, 14]).
    """

    def __init__(self, means, weights, variances, schedule: Schedule | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if means.ndim != 2:
            raise ApsError(f"mixture means must be (K, d), got shape {tuple(means.shape)}")
        k, d = means.shape
        if weights.shape != (k,) or not (weights > 0).all():
            raise ApsError(f"mixture weights must be ({k},) and positive, got shape {tuple(weights.shape)}")
        if variances.shape == (k,):
            variances = variances[:, None].expand(k, d).clone()
        if variances.shape != (k, d) or not (variances > 0).all():
            raise ApsError(f"mixture variances must be ({k},) or ({k}, {d}) and positive")
        for name, v in (("means", means), ("weights", weights), ("variances", variances)):
            if not torch.isfinite(v).all():
                raise ApsError(f"mixture {name} contain NaN or inf")
        dtype = torch.get_default_dtype()
        self.register_buffer("means", means.to(dtype))
        self.register_buffer("log_weights", torch.log(weights / weights.sum()).to(dtype))
        self.register_buffer("variances", variances.to(dtype))
        self.schedule = schedule or ContinuousSchedule()
        self.event_shape = (d,)
        # one variance per component (MCGdiff's unit ones): p_t's squared distances come from one matmul,
        # (B, K) work instead of (B, K, d) (what the ELBO at d = 800 needs; `_isotropic_log_normal`)
        self.isotropic = bool((variances == variances[:, :1]).all())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _noised(self, t):
        """Component means (B, K, d) and variances (B, K, d) of p_t at times t (B,)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = alpha.to(self.means.dtype), sigma.to(self.means.dtype)
        mean = alpha[:, None, None] * self.means
        var = alpha[:, None, None] ** 2 * self.variances + sigma[:, None, None] ** 2
        return mean, var

    @staticmethod
    def _log_normal(x, mean, var):
        """log N(x; mean, diag(var)) summed over the last axis; x (B, 1, d) against (B|1, K, d)."""
        return -0.5 * ((x - mean) ** 2 / var + torch.log(var) + LOG_2PI).sum(-1)

    def _responsibilities(self, x, mean, var):
        return torch.softmax(self.log_weights + self._log_normal(x[:, None, :], mean, var), dim=-1)

    def eps(self, x_t, t):
        """Exact eps = -sigma_t * grad log p_t(x_t), (B, d)."""
        _, sigma = self.schedule.alpha_sigma(t)
        return -_expand(sigma, x_t) * self.score_exact(x_t, t)

    def _isotropic_log_normal(self, x_t, t):
        """For isotropic components: log N(x_t; alpha mu_k, var_k I) (B, K), var_k = alpha^2 v_k + sigma^2 (B, K), alpha (B,).
        ||x - alpha mu_k||^2 = ||x||^2 - 2 alpha x . mu_k + alpha^2 ||mu_k||^2 (a matmul)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = alpha.to(self.means.dtype), sigma.to(self.means.dtype)
        var = alpha[:, None] ** 2 * self.variances[:, 0] + sigma[:, None] ** 2  # (B, K)
        dist = (x_t.pow(2).sum(1, keepdim=True) - 2 * alpha[:, None] * (x_t @ self.means.T)
                + alpha[:, None] ** 2 * self.means.pow(2).sum(1))
        d = self.dim
        return -0.5 * (dist.clamp_min(0) / var + d * torch.log(var) + d * LOG_2PI), var, alpha

    def score_exact(self, x_t, t):
        """grad_x log p_t(x_t), (B, d): sum_k r_k(x_t) (alpha mu_k - x_t) / var_k."""
        if self.isotropic:
            log_n, var, alpha = self._isotropic_log_normal(x_t, t)
            rv = torch.softmax(self.log_weights + log_n, dim=-1) / var  # (B, K): r_k / var_k
            return alpha[:, None] * (rv @ self.means) - x_t * rv.sum(1, keepdim=True)
        mean, var = self._noised(t)
        r = self._responsibilities(x_t, mean, var)  # (B, K)
        return (r[..., None] * (mean - x_t[:, None, :]) / var).sum(1)

    def log_prob_t(self, x_t, t):
        """Exact log p_t(x_t), (B,)."""
        if self.isotropic:
            return torch.logsumexp(self.log_weights + self._isotropic_log_normal(x_t, t)[0], dim=-1)
        mean, var = self._noised(t)
        return torch.logsumexp(self.log_weights + self._log_normal(x_t[:, None, :], mean, var), dim=-1)

    def log_prob(self, x):
        """Exact log p(x) of the clean mixture, (B,)."""
        return torch.logsumexp(self.log_weights + self._log_normal(x[:, None, :], self.means, self.variances), -1)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=self.means.device, dtype=self.means.dtype)
        return self.means[k] + self.variances[k].sqrt() * z

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (d,) and covariance (d, d) of the mixture (float64)."""
        w = self.log_weights.double().exp()
        mu, v = self.means.double(), self.variances.double()
        mean = w @ mu
        centred = mu - mean
        cov = torch.diag(w @ v) + (w[:, None] * centred).T @ centred
        return mean, cov

    def component_posterior_cov(self, operator) -> torch.Tensor:
        """Weight-averaged covariance of one component's posterior under a linear operator, (d, d), float64.

        The width of a single posterior mode: the natural unit for a flow's working space.
        """
        a = operator.matrix().double()
        s2 = float(operator.sigma_y) ** 2
        prec = torch.diag_embed(1.0 / self.variances.double()) + a.T @ a / s2  # (K, d, d)
        return torch.einsum("k,kij->ij", self.log_weights.double().exp(), torch.linalg.inv(prec))

    def component_posterior_frame(self, operator) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight-averaged gain (d, dy) and covariance (d, d) of one component's posterior, float64.

        Component k's posterior mean is mu_k + K_k (y - A mu_k) with K_k = S_k A^T G_k^-1, G_k = A S_k A^T + s^2 I,
        and its covariance S_k - K_k A S_k (Woodbury: dy x dy solves, any d). With equal component covariances
        (MCGdiff's) both are the same for every k, and so exact for each.
        """
        a = operator.matrix().double()
        s2 = float(operator.sigma_y) ** 2
        w, v = self.log_weights.double().exp(), self.variances.double()
        d, dy = v.shape[1], a.shape[0]
        gain, cov = torch.zeros(d, dy, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        for k in range(len(w)):  # one (d, d) at a time
            av = a * v[k]  # A S_k, (dy, d)
            gk = torch.linalg.solve(av @ a.T + s2 * torch.eye(dy, dtype=torch.float64), av).T  # (d, dy)
            gain += w[k] * gk
            cov += w[k] * (torch.diag(v[k]) - gk @ av)
        return gain, 0.5 * (cov + cov.T)

    def posterior(self, operator, y) -> "MixturePosterior":
        """Exact p(x | y) for a linear operator with Gaussian noise: a full-covariance mixture per y.

        y: (B, dy). Returns a MixturePosterior with means (B, K, d), one covariance per component.
        """
        a = operator.matrix().double()  # (dy, d)
        s2 = float(operator.sigma_y) ** 2
        y = operator.check_y(y).double()
        mu, v = self.means.double(), self.variances.double()  # (K, d)
        av = a[None] * v[:, None, :]  # A S_k, (K, dy, d)
        gram = av @ a.T + s2 * torch.eye(a.shape[0], dtype=torch.float64, device=a.device)  # (K, dy, dy)
        chol = torch.linalg.cholesky(gram)
        resid = y[:, None, :] - mu @ a.T  # (B, K, dy)
        # Woodbury: cov_k = S_k - S_k A^T G_k^-1 A S_k ; mean_k = mu_k + S_k A^T G_k^-1 (y - A mu_k)
        sol = torch.cholesky_solve(resid.permute(1, 2, 0), chol)  # (K, dy, B)
        means = mu[None] + torch.einsum("kyd,kyb->bkd", av, sol)
        covs = torch.diag_embed(v) - av.transpose(1, 2) @ torch.cholesky_solve(av, chol)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        log_evidence = (-0.5 * (resid.permute(1, 2, 0) * sol).sum(1).T
                        - torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(-1)
                        - 0.5 * a.shape[0] * LOG_2PI)  # (B, K)
        log_w = torch.log_softmax(self.log_weights.double() + log_evidence, dim=-1)
        return MixturePosterior(means, covs, log_w)


class MixturePosterior:
    """A batch of Gaussian mixtures with full covariances: means (B, K, d), covs (K, d, d), log_weights (B, K)."""

    def __init__(self, means, covs, log_weights):
        self.means, self.covs, self.log_weights = means, covs, log_weights
        # one covariance for all components (equal prior covariances, e.g. MCGdiff's unit ones): the samples are
        # whitened once instead of once per component, which is what makes d = 800 affordable (K x fewer solves)
        self.shared = bool((covs == covs[:1]).all())
        self._chol = torch.linalg.cholesky(covs[:1] if self.shared else covs)

    @property
    def weights(self):
        return self.log_weights.exp()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n, d) exact posterior samples."""
        b, k, d = self.means.shape
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (B, n)
        z = torch.randn(b, n, d, generator=generator, dtype=torch.float64, device=self.means.device)
        mean = torch.gather(self.means, 1, comp[..., None].expand(b, n, d))
        if self.shared:
            return mean + z @ self._chol[0].T
        noise = torch.empty_like(z)
        for j in range(k):  # one (d, d) factor per component, never a (B, n, d, d) gather
            hit = comp == j
            noise[hit] = z[hit] @ self._chol[j].T
        return mean + noise

    def component_log_probs(self, x):
        """log w_k + log N_k(x), (B, n, K) for x (B, n, d)."""
        x = x.double()
        b, n, d = x.shape
        k = self.means.shape[1]
        half_logdet = torch.log(torch.diagonal(self._chol, dim1=-2, dim2=-1)).sum(-1)  # (K,) or (1,)
        if self.shared:  # ||L^-1 (x - m_k)||^2 = ||L^-1 x - L^-1 m_k||^2: whiten x and the means once
            chol = self._chol[0]
            xw = torch.linalg.solve_triangular(chol, x.reshape(-1, d).T, upper=False).T.reshape(b, n, d)
            mw = torch.linalg.solve_triangular(chol, self.means.reshape(-1, d).T, upper=False).T.reshape(b, k, d)
            sq = (xw.pow(2).sum(-1)[..., None] - 2 * xw @ mw.transpose(1, 2) + mw.pow(2).sum(-1)[:, None, :])
        else:
            sq = torch.empty(b, n, k, dtype=x.dtype, device=x.device)
            for j in range(k):  # (B, n, d) per component, not (B, n, K, d) at once
                diff = x - self.means[:, None, j]
                sol = torch.linalg.solve_triangular(self._chol[j], diff.reshape(-1, d).T, upper=False)
                sq[..., j] = sol.pow(2).sum(0).reshape(b, n)
        log_n = -0.5 * sq.clamp_min(0) - half_logdet - 0.5 * d * LOG_2PI
        return self.log_weights[:, None, :] + log_n

    def log_prob(self, x):
        """Exact log p(x | y), (B, n) for x (B, n, d)."""
        return torch.logsumexp(self.component_log_probs(x), dim=-1)

    def assign(self, x):
        """Most responsible component of each sample, (B, n) (the Bayes classifier of the mixture)."""
        return self.component_log_probs(x).argmax(-1)
