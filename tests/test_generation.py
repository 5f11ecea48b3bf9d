"""KV-cache generation: equals a full-recompute reference, and TP=2 samples what TP=1 samples.
The sampler: counter-based keys (pinned to an exact integer reference), the exact filtered
distribution, tokens independent of how rows are batched, and a lagged all-done check that
returns the same tokens."""
import torch

from harness import run_distributed
from test_model_parallel import _build, VOCAB

from atesd_mc.generation import SampleKeys, SamplingParams, filter_logits, generate, sample_next, stream_key


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


# ------------------------------------------------------------------------------------- the sampler

M64, GAMMA = 2 ** 64 - 1, 0x9E3779B97F4A7C15


def _mix(z):
    """SplitMix64's finaliser on Python ints: the exact reference for the numpy version."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _uniform(stream, index, t):
    seed = _mix(_mix((index + GAMMA) & M64) ^ stream)
    return (_mix((seed + (t + 1) * GAMMA) & M64) >> 40) / 2 ** 24


def test_uniforms_are_exact_integer_hashes_of_stream_index_position():
    stream = stream_key(3, 17, 0)
    z = 0
    for part in (3, 17, 0):
        z = _mix((z + part + GAMMA) & M64)
    assert stream == z and stream != stream_key(3, 17, 1) != stream_key(17, 3, 0)
    indices = (0, 5, 2 ** 40 + 3)
    table = SampleKeys(stream, indices).uniforms(6)
    assert table.dtype == torch.float32
    assert table.tolist() == [[_uniform(stream, i, t) for t in range(6)] for i in indices]
    # A row's uniforms depend on its own index only, and a longer table extends a shorter one.
    assert torch.equal(SampleKeys(stream, (5,)).uniforms(4)[0], table[1, :4])


def _exact(logits, temperature, top_k, top_p):
    """The filtered softmax in float64, written out: top-k, then the smallest prefix of the
    sorted distribution whose mass reaches top_p."""
    p = torch.softmax(logits.double() / temperature, -1)
    kth = sorted(p.tolist(), reverse=True)[top_k - 1]
    p = torch.where(p >= kth, p, torch.zeros_like(p))
    p = p / p.sum()
    keep, mass = set(), 0.0
    for j in sorted(range(len(p)), key=lambda j: -float(p[j])):
        if mass >= top_p:
            break
        keep.add(j)
        mass += float(p[j])
    p = torch.tensor([float(p[j]) if j in keep else 0.0 for j in range(len(p))], dtype=torch.float64)
    return p / p.sum()


def test_sampler_draws_the_exact_filtered_distribution():
    logits = torch.tensor([1.3, -0.2, 2.1, 0.4, 0.9, -1.5, 1.8, 0.0, 2.4, -0.7, 1.1, 0.6])
    params = SamplingParams(max_new_tokens=1, temperature=0.8, top_k=8, top_p=0.9)
    p = _exact(logits, 0.8, 8, 0.9)
    n = 200_000
    u = SampleKeys(stream_key(1, 2, 3), tuple(range(n))).uniforms(1)[:, 0]
    counts = torch.bincount(sample_next(logits.expand(n, -1), params, u), minlength=len(logits)).double()
    kept = p > 0
    assert int(kept.sum()) == 6  # top-k keeps 8, top-p then 6
    assert counts[~kept].sum() == 0  # a filtered token is never drawn
    chi2 = float((((counts - n * p) ** 2)[kept] / (n * p[kept])).sum())
    # 25.74: the 99.99th percentile of chi-square with 5 degrees of freedom. Moving 1% of the mass
    # from one kept token to another scores over 100 at n = 200,000.
    assert chi2 < 25.74, (chi2, counts.tolist(), (n * p).tolist())


def test_inverse_cdf_edges_and_greedy():
    logits = torch.tensor([[0.5, 2.0, 1.0, -9.0, 1.5, -9.0]])
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_k=4, top_p=1.0)
    top = torch.tensor([1 - 2 ** -24])
    assert sample_next(logits, params, torch.zeros(1)).item() == 0  # first token with mass
    assert sample_next(logits, params, top).item() == 4  # last kept, never the filtered tail
    assert sample_next(logits, SamplingParams(max_new_tokens=1, temperature=0), None).item() == 1
    one = SamplingParams(max_new_tokens=1, temperature=1.0, top_k=1)
    assert sample_next(logits, one, top).item() == sample_next(logits, one, torch.zeros(1)).item() == 1
    # The cut points are the float64 CDF's (up to float32 rounding).
    cdf = torch.softmax(logits[0, [0, 1, 2, 4]].double(), -1).cumsum(-1)
    for j, c in enumerate(cdf[:-1].tolist()):
        below, above = torch.tensor([c - 1e-6]), torch.tensor([c + 1e-6])
        assert sample_next(logits, params, below).item() == [0, 1, 2, 4][j]
        assert sample_next(logits, params, above).item() == [0, 1, 2, 4][j + 1]


def _split_batches(lean):
    model = _build()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (6, 9, 4, 7)]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50)
    keys = SampleKeys(stream_key(3, 1, 0), (20, 21, 22, 23))
    whole = generate(model, prompts, params, keys, lean=lean).tokens
    again = generate(model, prompts, params, keys, lean=lean).tokens
    halves = (generate(model, prompts[:2], params, keys.select([0, 1]), lean=lean).tokens
              + generate(model, prompts[2:], params, keys.select([2, 3]), lean=lean).tokens)
    other = generate(model, prompts, params, SampleKeys(stream_key(3, 2, 0), keys.indices), lean=lean).tokens
    return whole, again, halves, other


def test_tokens_depend_on_the_sample_not_on_the_batch():
    for lean in (False, True):
        whole, again, halves, other = run_distributed(_split_batches, world=1, args=(lean,))[0]
        assert whole == again == halves  # deterministic, and 4 rows == 2 + 2 rows
        assert other != whole  # another stream (step) samples other tokens
        assert all(len(t) == 10 for t in whole)


def _eos_runs():
    from atesd_mc import generation

    model = _build()
    p = torch.randint(1, VOCAB, (6,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = [p[:4], p, p[:5]]  # one prefix: the rows share some tokens
    keys = SampleKeys(stream_key(9), (0, 1, 2))
    params = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=4)
    free = generate(model, prompts, params, keys).tokens
    # End of sequence: the token every row samples soonest, so all rows stop (at different
    # steps) before max_new_tokens; the tokens before it do not change.
    common = set(free[0]).intersection(*free[1:])
    eos = min(common, key=lambda v: max(t.index(v) for t in free))
    params.eos_id = eos
    calls = {"n": 0}
    real = generation._AllDone

    def counted(device, lagged=None):
        checker = real(device, lagged=lagged)

        def check(done):
            calls["n"] += 1
            return checker(done)
        return check

    out = {}
    for lagged in (False, True):
        calls["n"] = 0
        generation._AllDone = lambda device, lagged=lagged: counted(device, lagged)
        r = generate(model, prompts, params, keys)
        out[lagged] = (r.tokens, r.finished, calls["n"])
    generation._AllDone = real
    return eos, out


def test_lagged_all_done_check_returns_the_same_tokens():
    eos, out = run_distributed(_eos_runs, world=1)[0]
    (tokens, finished, steps), (lag_tokens, lag_finished, lag_steps) = out[False], out[True]
    assert all(finished) and all(t[-1] == eos for t in tokens)  # the early exit is exercised
    assert len({len(t) for t in tokens}) > 1 and max(len(t) for t in tokens) < 40
    assert (lag_tokens, lag_finished) == (tokens, finished)
    assert lag_steps == steps + 1  # one decode step late, never more
