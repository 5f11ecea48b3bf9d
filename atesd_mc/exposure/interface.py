"""The interface every exposure schedule shares, and the two rules they all apply.

Every schedule has the same step-level API, so the trainer treats them alike:
  alpha_for_step(step) -> float         alpha for student update `step` (call before it)
  observe(step, *, loss, mismatch, probe_nll, confidence, teacher_score) -> dict (after it)
  state_dict() / load_state_dict(sd)    plain numbers/strings/lists/dicts/tensors only, so
                                        torch.load(weights_only=True) can read them back
Only rank 0 runs a schedule; the trainer broadcasts alpha.

This module imports nothing else of the package: schedules.py (the baselines and the factory)
and controller.py (the adaptive schedule) both build on it, so imports go one way.
"""
from __future__ import annotations

from typing import Any, Protocol


class ExposureSchedule(Protocol):
    kind: str

    def alpha_for_step(self, step: int) -> float: ...

    def observe(self, step: int, **signals: Any) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...


def window_due(step: int, decided_step: int | None, hold_steps: int) -> bool:
    """A new decision is due when none was made yet or `step` is in another hold window
    (windows are [k*H, (k+1)*H); a resume mid-window keeps the held decision)."""
    return decided_step is None or step // hold_steps != decided_step // hold_steps


def check_kind(sd: dict, kind: str) -> None:
    """Refuse a saved state written by another kind of schedule."""
    if sd.get("kind") != kind:
        raise ValueError(f"exposure state is for {sd.get('kind')!r}, this schedule is {kind!r}")
