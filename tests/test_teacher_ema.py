"""EMA teacher: the average is kept in fp32 for a bf16 model (a float64 EMA is the reference),
it follows the student's effective weights W + scale * B A under LoRA, it is the same at TP=2 as
at TP=1, and a checkpoint round trip keeps the fp32 average bit for bit."""
import types

import torch

from harness import run_distributed
from test_lora import _fill_b, _lora_model
from test_model_parallel import _build, _tokens
from test_trainer import _cfg

U32 = 2.0 ** -24  # fp32 unit roundoff


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing (8 significant bits) at |x|, in float64."""
    _, exp = torch.frexp(x.abs().clamp_min(2.0 ** -126))  # |x| = m 2^exp, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), exp - 8)


# ------------------------------------------------------------------------------------ bf16 vs float64

def _ema_bf16(steps: int, decay: float):
    """A bf16 student moved away from the teacher's start (by ~10% of each tensor's mean
    magnitude: a step (1 - d)(p_S - p_T) is then under half a bf16 ulp of p_T), then `steps`
    updates; returns the start, the target and the teacher's weights and fp32 average."""
    from atesd_mc.model.teacher import Teacher

    student = _build(params_dtype="bf16")
    teacher = Teacher("ema", student, lambda: _build(params_dtype="bf16"), decay)
    start = {n: p.detach().double().clone() for n, p in teacher.module.named_parameters()}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1 * p.detach().float().abs().mean()
            p.add_(noise.to(p.dtype))
    target = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    for _ in range(steps):
        teacher.after_optimizer_step()
    params = {n: p.detach().double().clone() for n, p in teacher.module.named_parameters()}
    dtypes = {p.dtype for p in teacher.module.parameters()}
    return start, target, params, teacher.state_dict(), dtypes


def test_bf16_ema_tracks_a_float64_ema_over_300_steps():
    decay, steps = 0.99, 300
    start, target, params, state, dtypes = run_distributed(_ema_bf16, world=1, args=(steps, decay))[0]
    assert dtypes == {torch.bfloat16}
    moved = total = 0
    for name, t0 in start.items():
        ref = t0.clone()
        for _ in range(steps):
            ref = decay * ref + (1 - decay) * target[name]
        scale = torch.maximum(t0.abs(), target[name].abs())
        # fp32 average: each step rounds d*s, (1-d)*t, their sum and holds d, 1-d in fp32, at most
        # 4 u32 * |values| per step; the average contracts errors by d, so <= 4 u32 / (1 - d).
        fp32_bound = 4 * U32 / (1 - decay) * scale
        # What the forward reads: the fp32 average rounded to bf16, within half a bf16 ulp of the
        # float64 EMA plus the average's own bound (bf16 in place stalls ~85% of p_S - p_T0 short).
        assert ((params[name] - ref).abs() <= 0.5 * _bf16_ulp(ref) + fp32_bound).all(), name
        assert state[name].dtype == torch.float32
        assert ((state[name].double() - ref).abs() <= fp32_bound).all(), name
        moved += int(((ref - t0).abs() > _bf16_ulp(t0)).sum())
        total += t0.numel()
    assert moved > 0.5 * total  # the average really travelled (most weights by > 1 bf16 ulp)


# ------------------------------------------------------------------------------------ LoRA

def _adapted_weights(model) -> dict[str, torch.Tensor]:
    """W_eff of every adapted linear (TP=1) through the module's own forward, hooks included:
    with x = I the adapted output is I W^T + scale (I A^T) B^T = W_eff^T."""
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_delta"):
                eye = torch.eye(module.weight.shape[1], dtype=module.weight.dtype).unsqueeze(1)
                out[f"{name}.weight"] = module(eye)[0][:, 0, :].t().double()
    return out


def _lora_ema(decay: float, early: int, late: int):
    from atesd_mc.model.lora import lora_disabled
    from atesd_mc.model.qwen3 import full_logits
    from atesd_mc.model.teacher import Teacher

    student = _lora_model()  # fp32 on CPU, B = 0: the teacher starts at the base weights
    teacher = Teacher("ema", student, _build, decay)
    start = {n: p.detach().double().clone() for n, p in teacher.module.named_parameters()}
    _fill_b(student)  # "training" moved the adapters
    w_eff = _adapted_weights(student)
    for _ in range(early):
        teacher.after_optimizer_step()
    after_early = {n: p.detach().double().clone() for n, p in teacher.module.named_parameters()}
    for _ in range(late - early):
        teacher.after_optimizer_step()
    with torch.no_grad(), teacher.context() as module:
        logits = {"teacher": full_logits(module, _tokens()), "student": full_logits(student, _tokens())}
        with lora_disabled(student):
            logits["base"] = full_logits(student, _tokens())
    return start, w_eff, after_early, logits


def test_ema_follows_the_lora_effective_weights():
    decay, early = 0.5, 3
    start, w_eff, after_early, logits = run_distributed(_lora_ema, world=1, args=(decay, early, 60))[0]
    assert len(w_eff) == 8  # qkv, proj, fc1, fc2 in both layers
    for name, t0 in start.items():
        goal = w_eff.get(name, t0)  # unadapted weights: the student's, unchanged since the start
        ref = decay ** early * t0 + (1 - decay ** early) * goal
        # fp32 rounding of B A (rank-4 sums, here and in the reference), of W + delta and of
        # three averaging steps (<= 4 ulps each): within 16 ulps of the tensor's largest value.
        tol = 16 * U32 * torch.maximum(t0.abs().max(), goal.abs().max())
        assert (after_early[name] - ref).abs().max() <= tol, name
        if name in w_eff:
            assert (goal - t0).abs().max() > 1e-2, name  # the adapters change this weight
    # After 60 steps at d = 0.5 (d^60 ~ 1e-18) the teacher is the adapted student.
    assert (logits["student"] - logits["base"]).abs().max() > 1e-2
    assert (logits["teacher"] - logits["student"]).abs().max() <= 1e-5


def _tp_teacher_logits(tp: int):
    from atesd_mc.model.qwen3 import full_logits
    from atesd_mc.model.teacher import Teacher

    student = _lora_model(tp)
    teacher = Teacher("ema", student, lambda: _build(tp), 0.7)
    _fill_b(student)
    for _ in range(5):  # 0.7^5 = 0.17: still between the base and the adapted weights
        teacher.after_optimizer_step()
    with torch.no_grad(), teacher.context() as module:
        return full_logits(module, _tokens()), full_logits(student, _tokens())


def test_lora_ema_teacher_tp2_equals_tp1():
    ref, student = run_distributed(_tp_teacher_logits, world=1, args=(1,))[0]
    assert (ref - student).abs().max() > 1e-3  # mid-way: the adapters' share still matters
    for out, _ in run_distributed(_tp_teacher_logits, world=2, tp=2, args=(2,)):
        assert (out - ref).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------ checkpoints

def _ema_cfg(tmp):
    cfg = _cfg(tmp, train_iters=3, warm_start_iters=10)
    cfg.model.params_dtype = "bf16"
    cfg.model.teacher_mode = "ema"
    cfg.model.teacher_ema_decay = 0.9
    return cfg


def _train(cfg, steps: int, save: bool):
    """Build (resuming from the run's checkpoint if there is one), train, maybe save; returns the
    iteration, the teacher's state (fp32 averages) and its bf16 parameters."""
    from atesd_mc.trainer import build_trainer

    trainer = build_trainer(cfg)
    skipped = [trainer.train_step()["skipped"] for _ in range(steps)]
    assert not any(skipped)  # every step updated the teacher
    if save:
        trainer.save_checkpoint()
    teacher = trainer.rt.teacher
    params = {n: p.detach().clone() for n, p in teacher.module.named_parameters()}
    state = {k: v for k, v in teacher.state_dict().items() if torch.is_tensor(v)}  # no _extra_state
    return trainer.step, state, params


def test_ema_state_survives_save_and_resume_bit_for_bit(tmp_path):
    cfg = _ema_cfg(tmp_path)
    step, saved, saved_params = run_distributed(_train, world=1, args=(cfg, 2, True))[0]
    assert step == 2 and {p.dtype for p in saved_params.values()} == {torch.bfloat16}
    # The fp32 averages carry more than their bf16 rounding: restoring the parameters only fails.
    assert any(not torch.equal(v, v.bfloat16().float()) for v in saved.values())
    step, loaded, loaded_params = run_distributed(_train, world=1, args=(cfg, 0, False))[0]
    assert step == 2 and saved.keys() == loaded.keys()
    for k in saved:
        assert saved[k].dtype == loaded[k].dtype and torch.equal(saved[k], loaded[k]), k
    for k in saved_params:
        assert torch.equal(saved_params[k], loaded_params[k]), k
    # The resumed average continues the uninterrupted one: 2 + 1 steps == 3 steps.
    straight = _ema_cfg(tmp_path / "straight")
    straight.data.cache_dir = cfg.data.cache_dir
    _, ref, _ = run_distributed(_train, world=1, args=(straight, 3, False))[0]
    _, resumed, _ = run_distributed(_train, world=1, args=(cfg, 1, False))[0]
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k


def _old_format_checkpoint(path: str):
    """A checkpoint as written before the fp32 average (the teacher's bf16 parameters under the
    sharded keys "teacher.*"), read back by today's run_state: the average starts from it."""
    from atesd_mc import checkpoint as ckpt
    from atesd_mc import run_state
    from atesd_mc.model.teacher import Teacher

    def runtime(seed):
        student = _build(params_dtype="bf16")
        with torch.no_grad():  # a teacher other than the fresh student's copy
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(p.dtype) * 0.01)
        teacher = Teacher("ema", student, lambda: _build(params_dtype="bf16"), 0.9)
        return types.SimpleNamespace(model=student, teacher=teacher)

    old = runtime(1)
    ckpt.save_sharded({"model": old.model.sharded_state_dict(),
                       "teacher": old.teacher.module.sharded_state_dict(prefix="teacher.")}, path)
    new = runtime(2)
    loaded = ckpt.load_sharded(run_state._sharded(new, loading=True, with_optimizer=False), path)
    new.teacher.module.load_state_dict(loaded["teacher"], strict=False)  # as run_state.load does
    want = {n: p.detach().float() for n, p in old.teacher.module.named_parameters()}
    return want, {k: v for k, v in new.teacher.state_dict().items() if torch.is_tensor(v)}


def test_checkpoint_written_before_the_fp32_average_loads(tmp_path):
    want, got = run_distributed(_old_format_checkpoint, world=1, args=(str(tmp_path / "iter"),))[0]
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
