"""The teacher: the same network with other weights, scoring the student's rollout in no-grad.

Modes (docs/METHOD.md, Teacher weights):
* lora_off    - the student's module with adapters disabled: base weights = theta_0 (no copy).
* frozen_copy - a second stage built like the student, loaded with theta_0, never updated.
* ema         - like frozen_copy, then p_T <- d p_T + (1 - d) p_S after every optimizer step.
* live        - the student's current weights under no_grad (stop-gradient)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from atesd_mc.model.lora import lora_disabled
from atesd_mc.model.qwen3 import unwrap


class Teacher:
    def __init__(self, mode: str, student, build_stage: Callable[[], torch.nn.Module],
                 ema_decay: float = 0.99):
        self.mode = mode
        self.ema_decay = ema_decay
        self._student = unwrap(student)
        self.module = self._student
        if mode in ("frozen_copy", "ema"):
            self.module = build_stage()
            self.module.load_state_dict(self._student.state_dict(), strict=False)
            for p in self.module.parameters():
                p.requires_grad_(False)
            self.module.eval()

    @property
    def has_own_weights(self) -> bool:
        """True when the teacher state is not derivable from the student (checkpoint it)."""
        return self.mode in ("frozen_copy", "ema")

    @contextlib.contextmanager
    def context(self):
        """Enter before a teacher forward: no autograd, adapters off for lora_off."""
        with torch.no_grad():
            if self.mode == "lora_off":
                with lora_disabled(self._student):
                    yield self.module
            else:
                yield self.module

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.mode != "ema":
            return
        d = self.ema_decay
        teacher = dict(self.module.named_parameters())
        for name, p in self._student.named_parameters():
            if name in teacher:
                teacher[name].mul_(d).add_(p.detach().to(teacher[name].dtype), alpha=1 - d)

    def state_dict(self) -> dict:
        return self.module.state_dict() if self.has_own_weights else {}

    def load_state_dict(self, state: dict) -> None:
        if self.has_own_weights and state:
            self.module.load_state_dict(state, strict=False)
