"""KV-cache generation: equals a full-recompute reference, and TP=2 samples what TP=1 samples."""
import torch

from harness import run_distributed
from test_model_parallel import _build, VOCAB

from atesd_mc.generation import SamplingParams, filter_logits, generate


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 7)]


def _greedy_reference(model, prompts, n):
    """Re-run the whole prefix for every token: the slow oracle."""
    from atesd_mc.model.qwen3 import full_logits

    out = []
    for p in prompts:
        seq = list(p)
        for _ in range(n):
            logits = full_logits(model, torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
        out.append(seq[len(p):])
    return out


def _kv_vs_reference():
    model = _build()
    model.eval()
    with torch.no_grad():
        ref = _greedy_reference(model, _prompts(), 6)
    got = generate(model, _prompts(), SamplingParams(max_new_tokens=6, temperature=0),
                   torch.Generator().manual_seed(0))
    return ref, got.tokens


def test_kv_cache_greedy_equals_full_recompute():
    ref, got = run_distributed(_kv_vs_reference, world=1)[0]
    assert got == ref


def _sampled(tp):
    model = _build(tp)
    params = SamplingParams(max_new_tokens=8, temperature=1.1, top_p=0.95, top_k=20)
    return generate(model, _prompts(), params, torch.Generator().manual_seed(11)).tokens


def test_tp2_samples_same_tokens_as_tp1():
    ref = run_distributed(_sampled, world=1, args=(1,))[0]
    out = run_distributed(_sampled, world=2, tp=2, args=(2,))
    assert out[0] == ref and out[1] == ref


def test_pp2_samples_same_tokens_as_pp1():
    from test_model_parallel import _full_state, _load_full_state  # noqa: F401

    ref = run_distributed(_sampled_pp, world=1, args=(1, None))[0]
    state = run_distributed(_full_state_tied, world=1)[0]
    ref = run_distributed(_sampled_pp, world=1, args=(1, state))[0]
    out = run_distributed(_sampled_pp, world=2, pp=2, args=(2, state))
    assert out[0] == ref and out[1] == ref


def _full_state_tied():
    model = _build()
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _sampled_pp(pp, state):
    from test_model_parallel import _load_full_state

    model = _build(1, pp)
    if state is not None:
        if pp > 1 and "output_layer.weight" in model.state_dict() and "output_layer.weight" not in state:
            state = dict(state, **{"output_layer.weight": state["embedding.word_embeddings.weight"]})
        _load_full_state(model, state)
    params = SamplingParams(max_new_tokens=8, temperature=1.1, top_p=0.95, top_k=20)
    return generate(model, _prompts(), params, torch.Generator().manual_seed(11)).tokens


def test_eos_stops_and_top_k_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    f = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isinf(f[0, 0]) and torch.isinf(f[0, 3]) and not torch.isinf(f[0, 1:3]).any()
    f = filter_logits(logits, top_k=0, top_p=0.5)  # top token alone holds > 0.5 of the mass
    assert (~torch.isinf(f)).sum() == 1 and not torch.isinf(f[0, 1])
