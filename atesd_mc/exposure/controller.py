"""Adaptive exposure controller: a Beta policy over alpha trained by REINFORCE (docs/METHOD.md, Controller).

Life of a decision: alpha_for_step(t0) at the start of a hold window samples alpha_raw from the
policy at the current state s (features.py) and holds alpha = clip(alpha_raw) for H updates.
After each student update the trainer calls observe(step, ...); once the signal L updates after
t0 is known (reward.py has the index convention) the decision is scored and queued; every B
queued decisions give one REINFORCE step:
  A_j = (R_j - mean R) / (std R + eps)              advantage_baseline = batch (the paper)
  A_j = z-score over the batch of R_j - (a + b t0_j)  advantage_baseline = detrended, with
        a + b t the least-squares line through every decision scored so far (>= 3 of them)
  L   = -mean_j A_j log pi(alpha_raw_j | s_j) + c * mean_j max(0, H[pi(.|s_j)] - H_target)^2
Decisions overlap their lookahead windows (L > H); each is scored on its own window.

Everything runs in float64 on CPU on rank 0 only; all randomness comes from one private
torch.Generator (policy init, then one uniform per decision), so the controller never touches
the global RNG, and state_dict() captures everything needed for bit-identical resumption.
"""
from __future__ import annotations

import copy

import torch

from .beta_policy import BetaPolicy, beta_entropy, beta_icdf, beta_log_prob
from .features import NUM_FEATURES, RunningMoments, StateFeatures
from .reward import (SignalSeries, advantages, batch_zscore, check_variant, combine_rewards,
                     decision_components, detrend, reward_horizon)
from .interface import check_kind, window_due

_DTYPE = torch.float64
_STATE_VERSION = 1


class AdaptiveController:
    """Learned exposure schedule; the interface.ExposureSchedule API, like schedules.FixedExposure
    and schedules.RandomExposure.

    reward_variant (full | lp_only | one_step), reward_gt_norm (batch | running) and
    advantage_baseline (batch | detrended) default to the config fields of those names when
    present, else "full", "batch" and "batch".

    Trainer protocol (rank 0): optionally observe(-1, probe_nll=...) before training (gives
    the first decision its baseline l_0; without it that decision's first term is skipped);
    then per update t: alpha = alpha_for_step(t); train; observe(t, ...). Advantages are
    normalised over the B decisions of an update, so decisions_per_update = 1 never learns
    (its advantage is always 0).
    """

    kind = "adaptive"

    def __init__(self, cfg, exposure, total_steps: int, seed: int, *,
                 reward_variant: str | None = None, reward_gt_norm: str | None = None):
        self.cfg, self.alpha_min, self.alpha_max = cfg, exposure.alpha_min, exposure.alpha_max
        self.variant = reward_variant or getattr(cfg, "reward_variant", "full")
        self.gt_norm = reward_gt_norm or getattr(cfg, "reward_gt_norm", "batch")
        self.baseline = getattr(cfg, "advantage_baseline", "batch")
        check_variant(self.variant, self.gt_norm, self.baseline)
        self.horizon = reward_horizon(self.variant, cfg.lookahead_steps)
        self.generator = torch.Generator("cpu").manual_seed(int(seed))
        self.policy = BetaPolicy(NUM_FEATURES, cfg.controller_hidden, cfg.controller_layers,
                                 cfg.controller_init_mean, cfg.controller_init_concentration,
                                 self.generator, dtype=_DTYPE)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.controller_lr)
        two = torch.tensor(2.0, dtype=_DTYPE, device="cpu")
        self.entropy_target = (float(beta_entropy(two, two)) if cfg.entropy_target is None
                               else float(cfg.entropy_target))
        self.features = StateFeatures(total_steps, cfg.state_ema_decay)
        self.signals = SignalSeries()
        self.gt_moments = RunningMoments()
        self.alpha: float | None = None
        self.decided_step: int | None = None
        self.last_step: int | None = None
        self.open: list[dict] = []      # decided, lookahead not complete
        self.pending: list[dict] = []   # scored, waiting for a full batch of B
        # (t0, R) of every decision that entered a REINFORCE update: the detrended baseline's fit
        self.history: dict[str, list] = {"t0": [], "reward": []}
        self.counters = {"decisions": 0, "updates": 0, "skipped_updates": 0, "dropped": 0}

    # ---------------------------------------------------------------- decisions

    def alpha_for_step(self, step: int) -> float:
        """alpha for student update `step`; samples a new decision at a window start."""
        if window_due(step, self.decided_step, self.cfg.hold_steps):
            self._decide(step)
        return self.alpha

    def _decide(self, step: int) -> None:
        state = self.features.state(step)
        alpha_raw, a, b = self.policy.sample(state, self.generator)
        self.alpha = min(max(alpha_raw, self.alpha_min), self.alpha_max)
        self.decided_step = step
        self.open.append({"t0": step, "state": state, "alpha_raw": alpha_raw,
                          "alpha": self.alpha, "beta_a": a, "beta_b": b})
        self.counters["decisions"] += 1

    @property
    def last_decision(self) -> dict | None:
        """The most recent decision record (t0, state, alpha_raw, alpha, beta_a, beta_b)."""
        return self.open[-1] if self.open else None

    # ---------------------------------------------------------------- observations

    def observe(self, step: int, *, loss=None, mismatch=None, probe_nll=None, confidence=None,
                teacher_score=None) -> dict:
        """Statistics of student update `step` (step=-1: optional pre-training measurement).

        Non-finite values are skipped (features keep their EMA; the signal is marked missing).
        Returns a logging dict: alpha, completed decisions, dropped count, whether a REINFORCE
        update ran (and its loss, rewards, advantages, decision_steps), beta_a/beta_b/policy_mean
        now. Should several updates run in one call, their per-decision lists are concatenated
        (the scalars are the last update's), so no decision goes unlogged.
        """
        if step < -1 or (self.last_step is not None and step <= self.last_step):
            raise ValueError(f"observe(step={step}) after step {self.last_step}: "
                             "steps must increase")
        self.features.update(step, alpha=self.alpha, loss=loss, mismatch=mismatch,
                             probe_nll=probe_nll, confidence=confidence)
        signal = probe_nll if self.cfg.reward_signal == "probe_nll" else loss
        self.signals.set(step + 1, signal, teacher_score)
        self.last_step = step
        completed, dropped = self._complete_decisions()
        self.signals.prune(min([d["t0"] for d in self.open] + [step + 1]))
        info = {"alpha": self.alpha, "completed": completed, "dropped": dropped, "updated": False}
        B = self.cfg.decisions_per_update
        while len(self.pending) >= B:
            batch, self.pending = self.pending[:B], self.pending[B:]
            rec = self._reinforce(batch)
            for k in ("rewards", "advantages", "decision_steps"):
                rec[k] = info.get(k, []) + rec[k]
            info.update(rec)
        a, b, mean, _, _ = self.policy_summary(quantiles=False)
        info.update(beta_a=a, beta_b=b, policy_mean=mean)
        return info

    def _complete_decisions(self) -> tuple[list[dict], int]:
        """Score every open decision whose lookahead window is now known."""
        known, still_open, completed, dropped = self.last_step + 1, [], [], 0
        for d in self.open:
            t0 = d["t0"]
            if t0 + self.horizon > known:
                still_open.append(d)
                continue
            losses, _ = self.signals.window(t0, t0 + self.horizon)
            _, scores = self.signals.window(t0 + 1, t0 + self.horizon)
            progress, g_gt = decision_components(losses, scores, self.cfg.reward_gamma,
                                                 self.variant)
            if progress is None:  # no valid signal in the window: drop (see reward.py)
                dropped += 1
                continue
            rec = dict(d, progress=progress, g_gt=g_gt, z_gt=None)
            if self.variant == "full" and self.gt_norm == "running" and g_gt is not None:
                self.gt_moments.update(g_gt)
                rec["z_gt"] = self.gt_moments.normalise(g_gt, eps=1e-8)
            self.pending.append(rec)
            completed.append({k: rec[k] for k in ("t0", "alpha", "progress", "g_gt")})
        self.open = still_open
        self.counters["dropped"] += dropped
        return completed, dropped

    # ---------------------------------------------------------------- REINFORCE

    def _rewards(self, batch: list[dict]) -> list[float]:
        progress = [d["progress"] for d in batch]
        if self.variant != "full":
            return combine_rewards(progress, [], 0.0, self.variant)
        if self.gt_norm == "batch":
            z = batch_zscore([d["g_gt"] for d in batch])
        else:
            z = [d["z_gt"] if d["z_gt"] is not None else 0.0 for d in batch]
        return combine_rewards(progress, z, self.cfg.reward_lambda_gt, "full")

    def _reinforce(self, batch: list[dict]) -> dict:
        """One policy-gradient step on B scored decisions."""
        rewards = self._rewards(batch)
        steps = [d["t0"] for d in batch]
        adv = self._advantages(steps, rewards)
        states = torch.tensor([d["state"] for d in batch], dtype=_DTYPE, device="cpu")
        alpha_raw = torch.tensor([d["alpha_raw"] for d in batch], dtype=_DTYPE, device="cpu")
        a, b = self.policy(states)
        log_prob = beta_log_prob(alpha_raw, a, b)
        entropy = beta_entropy(a, b)
        pg_loss = -(torch.tensor(adv, dtype=_DTYPE, device="cpu") * log_prob).mean()
        penalty = self.cfg.entropy_coef * (entropy - self.entropy_target).clamp(min=0).pow(2).mean()
        loss = pg_loss + penalty
        applied = self._apply(loss)
        self.counters["updates" if applied else "skipped_updates"] += 1
        scalar = lambda t: t.detach().item()  # noqa: E731
        return {"updated": applied, "policy_loss": scalar(loss), "pg_loss": scalar(pg_loss),
                "entropy_penalty": scalar(penalty), "entropy": scalar(entropy.mean()),
                "rewards": rewards, "advantages": adv, "decision_steps": steps,
                "reward_mean": sum(rewards) / len(rewards)}

    def _advantages(self, steps: list[int], rewards: list[float]) -> list[float]:
        """Records the batch in the history, then z-scores its rewards (batch) or their
        residuals around the history's linear trend over time (detrended; with fewer than 3
        decisions a line is not yet a trend worth removing, so plain batch z-scores)."""
        self.history["t0"] += steps
        self.history["reward"] += rewards
        if self.baseline == "detrended" and len(self.history["t0"]) >= 3:
            return advantages(detrend(steps, rewards, self.history["t0"], self.history["reward"]))
        return advantages(rewards)

    def _apply(self, loss: torch.Tensor) -> bool:
        """Backward + Adam step; refuses (returns False) anything that would put a non-finite
        value into the parameters, restoring weights and Adam state if needed."""
        params = list(self.policy.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return False
        loss.backward()
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        saved = ([p.detach().clone() for p in params], copy.deepcopy(self.optimizer.state_dict()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if all(torch.isfinite(p).all() for p in params):
            return True
        with torch.no_grad():
            for p, old in zip(params, saved[0]):
                p.copy_(old)
        self.optimizer.load_state_dict(saved[1])
        return False

    # ---------------------------------------------------------------- reporting

    def policy_summary(self, state=None, quantiles: bool = True
                       ) -> tuple[float, float, float, float | None, float | None]:
        """(a, b, mean, q10, q90) of the policy at `state` (default: the current state).

        Quantiles are of the unclipped Beta (bisection on the regularised incomplete beta);
        None when quantiles=False (cheap per-step logging).
        """
        if state is None:
            step = 0 if self.last_step is None else self.last_step + 1
            state = self.features.state(step)
        state = [float(x) for x in (state.tolist() if torch.is_tensor(state) else state)]
        a, b = self.policy.params_for(state)
        if not quantiles:
            return a, b, a / (a + b), None, None
        return a, b, a / (a + b), beta_icdf(0.1, a, b), beta_icdf(0.9, a, b)

    # ---------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict:
        """Everything for bit-identical resumption; only tensors, numbers, None, strings,
        lists and dicts, so torch.load(..., weights_only=True) reads it."""
        return {
            "kind": self.kind, "version": _STATE_VERSION,
            "reward_variant": self.variant, "reward_gt_norm": self.gt_norm,
            "policy": {k: v.detach().clone() for k, v in self.policy.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "features": self.features.state_dict(), "signals": self.signals.state_dict(),
            "gt_moments": self.gt_moments.state_dict(),
            "open": copy.deepcopy(self.open), "pending": copy.deepcopy(self.pending),
            "history": copy.deepcopy(self.history),
            "alpha": self.alpha, "decided_step": self.decided_step, "last_step": self.last_step,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, sd: dict) -> None:
        check_kind(sd, self.kind)
        if sd.get("version") != _STATE_VERSION:
            raise ValueError(f"controller state version {sd.get('version')} != {_STATE_VERSION}")
        self.policy.load_state_dict(sd["policy"])
        # deep copy: Adam updates its state tensors in place and must not alias the caller's dict
        self.optimizer.load_state_dict(copy.deepcopy(sd["optimizer"]))
        self.generator.set_state(sd["generator"])
        self.features.load_state_dict(sd["features"])
        self.signals.load_state_dict(sd["signals"])
        self.gt_moments.load_state_dict(sd["gt_moments"])
        self.open, self.pending = copy.deepcopy(sd["open"]), copy.deepcopy(sd["pending"])
        # absent in states saved before the detrended baseline existed: start an empty history
        hist = sd.get("history") or {"t0": [], "reward": []}
        self.history = {"t0": [int(t) for t in hist["t0"]],
                        "reward": [float(r) for r in hist["reward"]]}
        self.alpha, self.decided_step = sd["alpha"], sd["decided_step"]
        self.last_step = sd["last_step"]
        self.counters = {k: int(v) for k, v in sd["counters"].items()}
