"""Plain-torch oracles for every kernel in this package.

They materialise everything ([N, V] log-softmaxes, per-sample Python loops) and use autograd for the
gradients, so they share no algebra with the kernels: the tests run them in float64 and compare.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def divergence_terms_ref(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "forward_kl",
                         beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-vocabulary divergence terms [N, V] (their sum over V is the token divergence)."""
    ls = F.log_softmax(student_logits / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return lt.exp() * (lt - ls)
    if kind == "reverse_kl":
        return ls.exp() * (ls - lt)
    if kind == "jsd":
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log1p(-beta)]), dim=0)
        return beta * lt.exp() * (lt - lm) + (1.0 - beta) * ls.exp() * (ls - lm)
    raise ValueError(kind)


def divergence_loss_ref(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "forward_kl",
                        beta: float = 0.5, temperature: float = 1.0, clip: float | None = None,
                        mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                        reduction: str = "mean") -> torch.Tensor:
    """Oracle for kernels.divergence.divergence_loss (no process group: callers pass unsplit logits)."""
    v = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    terms = divergence_terms_ref(student_logits.reshape(-1, v), teacher_logits.reshape(-1, v),
                                 kind=kind, beta=beta, temperature=temperature)
    if clip is not None:
        terms = torch.clamp(terms, max=clip)
    d = terms.sum(-1)
    n = d.shape[0]
    keep = torch.ones(n, dtype=torch.bool) if mask is None else mask.reshape(n).bool().cpu()
    w = torch.ones(n, dtype=d.dtype, device=d.device) if weights is None else weights.reshape(n).to(d.dtype)
    idx = torch.nonzero(keep).flatten().to(d.device)
    if reduction == "none":
        out = torch.zeros_like(d).index_put((idx,), d[idx] * w[idx])
        return out.reshape(lead)
    total = (d[idx] * w[idx]).sum()
    if reduction == "sum":
        return total
    denom = w[idx].sum()
    if idx.numel() == 0 or float(denom) == 0.0:
        return student_logits.sum() * 0.0
    return total / denom


def fused_linear_divergence_loss_ref(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                                     weight: torch.Tensor, teacher_weight: torch.Tensor | None = None,
                                     **kwargs) -> torch.Tensor:
    """Oracle for the fused op: materialise both logit matrices, then divergence_loss_ref."""
    tw = weight if teacher_weight is None else teacher_weight
    return divergence_loss_ref(student_hidden @ weight.t(), (teacher_hidden @ tw.t()).detach(), **kwargs)


def pack_masked_reference_ref(student_prompt, teacher_prefix, reference, answer, transition, rollout, keep):
    """Oracle for kernels.masked_reference.pack_masked_reference: per-sample Python concatenation.

    Each piece is a (values, offsets) pair; returns ((tokens, positions, cu_seqlens, rollout_index) teacher,
    same for student) as int64 tensors (cu_seqlens included)."""
    def piece(r, b, n=None):
        vals, off = r
        a = int(off[b])
        return vals[a:a + (int(off[b + 1]) - a if n is None else n)].tolist()

    nb = len(rollout[1]) - 1
    sides = {"teacher": [], "student": []}
    for b in range(nb):
        ro = piece(rollout, b)
        t_prompt = (piece(teacher_prefix, b) + piece(reference, b, int(keep[b])) + piece(answer, b)
                    + piece(transition, b))
        sides["teacher"].append((t_prompt, ro))
        sides["student"].append((piece(student_prompt, b), ro))
    out = []
    for name in ("teacher", "student"):
        tokens, positions, cu, ridx = [], [], [0], []
        for prompt, ro in sides[name]:
            ridx += [cu[-1] + len(prompt) + i for i in range(len(ro))]
            tokens += prompt + ro
            positions += list(range(len(prompt) + len(ro)))
            cu.append(cu[-1] + len(prompt) + len(ro))
        out.append(tuple(torch.tensor(x, dtype=torch.int64) for x in (tokens, positions, cu, ridx)))
    return tuple(out)
