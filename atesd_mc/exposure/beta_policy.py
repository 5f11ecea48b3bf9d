"""Beta policy over the reveal ratio (docs/METHOD.md, Controller: Policy) and the Beta-distribution maths it needs.

(a, b) = 1 + softplus(f_phi(s)), so a, b > 1 and the density is unimodal and zero at 0 and 1.
Density maths (log-prob, entropy) is in torch so it is differentiable. The CDF and its inverse
are plain-Python float64 (no scipy in library code): torch has no Beta icdf and, in this torch
build, no torch.special.betainc. The CDF is the regularised incomplete beta function evaluated
by its continued fraction (modified Lentz); the inverse is bisection on it. They are only used
for sampling one alpha per decision and for plotting quantiles, so speed is irrelevant.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def softplus_inverse(y: float) -> float:
    """x with softplus(x) = y, for y > 0 (stable for small and large y)."""
    return y + math.log(-math.expm1(-y))


def _log_beta_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def beta_log_prob(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log Beta(x; a, b), differentiable in a and b."""
    return (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x) - _log_beta_fn(a, b)


def beta_entropy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Closed-form differential entropy of Beta(a, b)."""
    dg = torch.digamma
    return (_log_beta_fn(a, b) - (a - 1) * dg(a) - (b - 1) * dg(b) + (a + b - 2) * dg(a + b))


def _betacf(x: float, a: float, b: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converges for
    x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta I_x(a, b) in float64."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (a * math.log(x) + b * math.log1p(-x)
                 - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(x, a, b) / a
    # symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps the continued fraction in its fast region
    return 1.0 - math.exp(log_front) * _betacf(1.0 - x, b, a) / b


def beta_icdf(u: float, a: float, b: float, tol: float = 1e-13) -> float:
    """Inverse CDF by bisection; for u in (0, 1) the result is strictly inside (0, 1)."""
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if beta_cdf(mid, a, b) < u:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _linear(n_in: int, n_out: int, dtype: torch.dtype) -> nn.Linear:
    # skip_init: nn.Linear's own init would draw from the *global* torch RNG, which would make
    # rank 0 (the only rank with a controller) diverge from the other ranks' random streams.
    return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, dtype=dtype, device="cpu")


class BetaPolicy(nn.Module):
    """f_phi: MLP (layers x hidden, tanh) -> 2 outputs -> (a, b) = 1 + softplus(out).

    The output layer's weights start at zero and its bias is set so that, for every state,
    a + b = init_concentration and a / (a + b) = init_mean. Hidden layers get the usual
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) init, drawn from the given generator.
    """

    def __init__(self, state_dim: int, hidden: int, layers: int, init_mean: float,
                 init_concentration: float, generator: torch.Generator,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        a0, b0 = init_concentration * init_mean, init_concentration * (1.0 - init_mean)
        if not (a0 > 1.0 and b0 > 1.0):
            raise ValueError(
                f"controller_init_mean={init_mean} with controller_init_concentration="
                f"{init_concentration} gives a={a0:.3g}, b={b0:.3g}; both must be > 1")
        dims = [state_dim] + [hidden] * layers
        self.hidden = nn.ModuleList(_linear(i, o, dtype) for i, o in zip(dims, dims[1:]))
        self.head = _linear(dims[-1], 2, dtype)
        with torch.no_grad():
            for lin in self.hidden:
                bound = 1.0 / math.sqrt(lin.in_features)
                nn.init.uniform_(lin.weight, -bound, bound, generator=generator)
                nn.init.uniform_(lin.bias, -bound, bound, generator=generator)
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([softplus_inverse(a0 - 1.0),
                                               softplus_inverse(b0 - 1.0)], dtype=dtype,
                                             device="cpu"))

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [..., state_dim] -> (a, b), each [...]."""
        h = states
        for lin in self.hidden:
            h = torch.tanh(lin(h))
        out = 1.0 + nn.functional.softplus(self.head(h))
        return out[..., 0], out[..., 1]

    def params_for(self, state: list[float]) -> tuple[float, float]:
        """(a, b) as floats for one state, without building a graph."""
        with torch.no_grad():
            dtype = self.head.weight.dtype
            a, b = self(torch.tensor(state, dtype=dtype, device="cpu"))
        return float(a), float(b)

    def sample(self, state: list[float], generator: torch.Generator) -> tuple[float, float, float]:
        """Draw alpha_raw ~ Beta(a, b) by inverse CDF of one uniform from `generator`.

        Returns (alpha_raw, a, b). Inverse-CDF sampling uses exactly one draw per decision, so
        the generator state alone determines every future alpha (save/load reproducibility).
        """
        a, b = self.params_for(state)
        u = torch.rand((), generator=generator, dtype=torch.float64, device="cpu").item()
        u = min(max(u, 1e-12), 1.0 - 1e-12)  # torch.rand can return exactly 0
        return beta_icdf(u, a, b), a, b
