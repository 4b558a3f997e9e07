"""The APS objective (docs/objective.md), term by term, and nothing else.

For a measurement y and x = G_phi(z; y), z ~ N(0, I):

    loss(phi; y) = E_z[ ||y - A(x)||^2 / (2 sigma_y^2)  +  L(x)  -  log|det dG_phi/dz| ]

an upper bound of KL(q_phi(.|y) || p(.|y)) - log p(y), with L(x) >= -log p_theta(x) the frozen
prior's ELBO. Here -log p(y|x) carries its normalising constant and log q = log N(z) - log|det|
carries E_z[log N(z)], so the reduced loss estimates KL - log p(y) (+ the ELBO gap) exactly,
not just up to a constant. Tempering (beta < 1) flattens the target: beta (nll + prior) + log_q; an
optional likelihood weight (guidance scale) w sharpens it: beta (w nll + prior) + log_q.

E_z is estimated by the flow's weighted samples, sum_j weight_j f(x_j) (`expectation`): weights 1/n_z
for i.i.d. draws of a standard-normal base; w_k(y) / m for the stratified draws of a mixture base,
which is how the reverse KL reaches the mixture weights (aps.flows.mixture_base).

The mass-covering term is the forward KL on data pairs (x, y): -log q_phi(x | y)
(neural posterior estimation, Papamakarios & Murray 2016).
"""
from __future__ import annotations

import torch


def aps_terms(flow, prior, operator, y, n_z: int = 1, n_elbo: int = 1, elbo_sampling: str = "lambda",
              exact_prior: bool = False, generator: torch.Generator | None = None, elbo_strata: str = "item",
              elbo_antithetic: bool = False) -> dict:
    """Per-sample terms of the APS loss for measurements y (B, *y_shape), each of shape (B, n) with n = n_z
    (or K * ceil(n_z / K) stratified draws for a K-component mixture base).

    Returns x (B, n, *event_shape) and
      nll    = -log p(y | x)                       (likelihood term)
      prior  = L(x), the ELBO bound on -log p(x)   (or exactly -log p(x) if exact_prior and the prior has it)
      log_q  = log q_phi(x | y) = log q0(z | y) - log|det dG/dz|
      weight = the samples' weights for E_z (sum 1 per y; differentiable for a mixture base)
    Gradients reach phi through x, also through the frozen prior's eps-network, and through weight.
    """
    b = y.shape[0]
    x, log_q, weight = flow.sample_weighted(y, n_z, generator)  # (B, n, *event), (B, n), (B, n)
    n_z = x.shape[1]
    x_flat = x.flatten(0, 1)  # (B * n, *event)
    y_rep = y.repeat_interleave(n_z, dim=0)
    nll = -operator.log_likelihood(y_rep, x_flat)
    if exact_prior:
        prior_term = -prior.log_prob(x_flat)
    else:
        prior_term = prior.elbo(x_flat, n_draws=n_elbo, sampling=elbo_sampling, generator=generator,
                                strata=elbo_strata, antithetic=elbo_antithetic)
    return {"x": x, "nll": nll.reshape(b, n_z), "prior": prior_term.reshape(b, n_z), "log_q": log_q,
            "weight": weight}


def aps_loss(terms: dict, beta: float = 1.0, likelihood_weight: float = 1.0) -> torch.Tensor:
    """Per-sample tempered loss beta * (w nll + prior) + log_q, (B, n); beta = w = 1 is the APS loss.

    w > 1 targets p(x) p(y | x)^w instead of the posterior: the guidance scale of classifier guidance
    (Dhariwal & Nichol 2021), a sharpened posterior, for likelihoods too weak for the flow to follow
    (a class label carries at most log 10 nats against the prior's hundreds). Off (1) by default.
    """
    return beta * (likelihood_weight * terms["nll"] + terms["prior"]) + terms["log_q"]


def expectation(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """E_z per measurement from weighted samples: sum_j weight_j values_j, (B, n) -> (B,)."""
    return (weight * values).sum(-1)


def forward_kl(flow, x, y) -> torch.Tensor:
    """Per-pair mass-covering term -log q_phi(x | y) for data pairs x (B, *event), y (B, *y_shape), (B,)."""
    return -flow.log_prob(x, y)
