"""The APS objective (DESIGN.md), term by term, and nothing else.

For a measurement y and x = G_phi(z; y), z ~ N(0, I):

    loss(phi; y) = E_z[ ||y - A(x)||^2 / (2 sigma_y^2)  +  L(x)  -  log|det dG_phi/dz| ]

an upper bound of KL(q_phi(.|y) || p(.|y)) - log p(y), with L(x) >= -log p_theta(x) the frozen
prior's ELBO. Here -log p(y|x) carries its normalising constant and log q = log N(z) - log|det|
carries E_z[log N(z)], so the reduced loss estimates KL - log p(y) (+ the ELBO gap) exactly,
not just up to a constant. Tempering (beta < 1) flattens the target: beta (nll + prior) + log_q.

The mass-covering term is the forward KL on data pairs (x, y): -log q_phi(x | y)
(neural posterior estimation, Papamakarios & Murray 2016).
"""
from __future__ import annotations

import torch


def aps_terms(flow, prior, operator, y, n_z: int = 1, n_elbo: int = 1, elbo_sampling: str = "lambda",
              exact_prior: bool = False, generator: torch.Generator | None = None) -> dict:
    """Per-sample terms of the APS loss for measurements y (B, *y_shape), each of shape (B, n_z).

    Returns x (B, n_z, *event_shape) and
      nll    = -log p(y | x)                       (likelihood term)
      prior  = L(x), the ELBO bound on -log p(x)   (or exactly -log p(x) if exact_prior and the prior has it)
      log_q  = log q_phi(x | y) = log N(z) - log|det dG/dz|
    Gradients reach phi through x, also through the frozen prior's eps-network.
    """
    b = y.shape[0]
    x, log_q = flow.sample(y, n_z, generator)  # (B, n_z, *event), (B, n_z)
    x_flat = x.flatten(0, 1)  # (B * n_z, *event)
    y_rep = y.repeat_interleave(n_z, dim=0)
    nll = -operator.log_likelihood(y_rep, x_flat)
    if exact_prior:
        prior_term = -prior.log_prob(x_flat)
    else:
        prior_term = prior.elbo(x_flat, n_draws=n_elbo, sampling=elbo_sampling, generator=generator)
    return {"x": x, "nll": nll.reshape(b, n_z), "prior": prior_term.reshape(b, n_z), "log_q": log_q}


def aps_loss(terms: dict, beta: float = 1.0) -> torch.Tensor:
    """Per-sample tempered loss beta * (nll + prior) + log_q, (B, n_z); beta = 1 is DESIGN.md's loss."""
    return beta * (terms["nll"] + terms["prior"]) + terms["log_q"]


def forward_kl(flow, x, y) -> torch.Tensor:
    """Per-pair mass-covering term -log q_phi(x | y) for data pairs x (B, *event), y (B, *y_shape), (B,)."""
    return -flow.log_prob(x, y)
