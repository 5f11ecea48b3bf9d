"""The teacher: the same network with other weights, scoring the student's rollout in no-grad.

Modes (docs/METHOD.md, Teacher weights):
* lora_off    - the student's module with adapters disabled: base weights = theta_0 (no copy).
* frozen_copy - a second stage built like the student, loaded with theta_0, never updated.
* ema         - like frozen_copy, then p_T <- d p_T + (1 - d) p_S after every optimizer step.
* live        - the student's current weights under no_grad (stop-gradient).

EMA precision: the average lives in an fp32 shadow of every teacher parameter, and the module the
forward reads holds its rounding. Averaging in bf16 in place loses each step whose (1 - d)(p_S - p_T)
is under half a bf16 ulp of p_T (at d = 0.99, 300 steps got 31% of the way instead of 95%). An fp32
teacher's parameters are their own shadow (no copy). The student's side is its effective weights:
base plus scale * B A for LoRA-adapted linears (lora.weight_deltas), in the dtype its forward uses.
Reading the optimizer's fp32 main parameters instead would need a gather across data-parallel ranks
under the distributed optimizer, for a source error (half a bf16 ulp, of either sign) that the
average itself smooths; the error that compounded was the accumulator's."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch

from atesd_mc.model.lora import lora_disabled, weight_deltas
from atesd_mc.model.qwen3 import unwrap


class Teacher:
    def __init__(self, mode: str, student, build_stage: Callable[[], torch.nn.Module],
                 ema_decay: float = 0.99):
        self.mode = mode
        self.ema_decay = ema_decay
        self._student = unwrap(student)
        self.module = self._student
        self._shadow: dict[str, torch.Tensor] = {}
        """EMA mode: parameter name -> its fp32 average (the parameter itself when fp32)."""
        if mode in ("frozen_copy", "ema"):
            self.module = build_stage()
            self.module.load_state_dict(self._student.state_dict(), strict=False)
            for p in self.module.parameters():
                p.requires_grad_(False)
            self.module.eval()
        if mode == "ema":
            self._init_shadow()

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

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def _init_shadow(self) -> None:
        """The average starts at the student's effective weights (its base ones while B = 0)."""
        for name, p in self.module.named_parameters():
            self._shadow[name] = p.data if p.dtype == torch.float32 else p.detach().float()
        for name, target in self._student_targets():
            self._shadow[name].copy_(target)
        self._publish()
        # A checkpoint load (run_state.load calls module.load_state_dict) must reach the fp32
        # average, not only the rounded parameters: take the values before the module copies them.
        self.module.register_load_state_dict_pre_hook(self._load_pre_hook)

    def _student_targets(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, the student's effective weight in fp32) for every averaged parameter."""
        deltas = weight_deltas(self._student)
        for name, p in self._student.named_parameters():
            if name in self._shadow:
                w = p.detach().float()
                yield name, (w + deltas[name] if name in deltas else w)

    def _publish(self) -> None:
        """Round the fp32 average into the parameters the forward reads."""
        params = dict(self.module.named_parameters())
        for name, s in self._shadow.items():
            if s.data_ptr() != params[name].data_ptr():
                params[name].copy_(s)

    def _load_pre_hook(self, module, state_dict, prefix, *_) -> None:
        with torch.no_grad():
            for name, s in self._shadow.items():
                value = state_dict.get(prefix + name)
                if value is not None:
                    s.copy_(value)  # fp32 from our checkpoints; an older bf16 one upcasts exactly

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.mode != "ema":
            return
        d = self.ema_decay
        for name, target in self._student_targets():
            self._shadow[name].mul_(d).add_(target, alpha=1 - d)
        self._publish()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The module's state with the fp32 averages in place of their rounded parameters."""
        if not self.has_own_weights:
            return {}
        return {**self.module.state_dict(), **{k: v.detach().clone() for k, v in self._shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if self.has_own_weights and state:
            self.module.load_state_dict(state, strict=False)

    def sharded_state_dict(self, prefix: str = "teacher.") -> dict:
        """The teacher's own weights for a dist checkpoint: sharded keys carry `prefix`, dict keys
        are the module's state-dict keys (what module.load_state_dict takes back). EMA: the fp32
        averages under the same sharded keys as the parameters, so a checkpoint written when the
        EMA was kept in the parameters' dtype still loads (upcast)."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        out = {}
        for key, item in self.module.sharded_state_dict(prefix=prefix).items():
            name = names.get(id(getattr(item, "data", None)))
            if name in self._shadow:
                shadow = self._shadow[name]
                fields = {"data": shadow, **({"dtype": shadow.dtype} if hasattr(item, "dtype") else {})}
                item = dataclasses.replace(item, **fields)
            out[key.removeprefix(prefix)] = item
        return out
