"""The blocked per-layer arithmetic equals a naive float64 reference, for any padding, dtype and bound,
and never materialises a block larger than the bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fimlora.fisher import blocks, estimate_fisher
from fimlora.fisher.blocks import Tokens
from fimlora.fisher.estimator import _Accumulator
from fimlora.fisher.memory import _SyntheticLayer, synthetic_layer_memory

# Right padding, left padding, a hole in the middle (not contiguous), an empty example, no padding.
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
        [1, 1, 0, 1, 0, 1, 1],
        [0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
)


def layer_batch(d_in=6, d_out=9, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(MASK.shape[0], MASK.shape[1], d_in, generator=g).to(dtype)
    d = torch.randn(MASK.shape[0], MASK.shape[1], d_out, generator=g).to(dtype)
    return a, d


def reference(a, d, mask):
    """Per example G_n = Σ_t m_t δ_t a_tᵀ, and the per-token sums, in float64."""
    m = mask.double().unsqueeze(-1)
    a, d = a.double() * m, d.double() * m
    grads = torch.einsum("bti,btj->bij", d, a)
    return {
        "diagonal": (grads**2).sum(0),
        "trace": (grads**2).sum(),
        "A": torch.einsum("bti,btj->ij", a, a),
        "S": torch.einsum("bti,btj->ij", d, d),
        "gradient": grads.sum(0),
    }


def test_fresh_accumulators_with_no_real_token_are_zero():
    a, d = layer_batch()
    empty = Tokens.from_mask(torch.zeros_like(MASK), *MASK.shape)
    diag, grad = torch.full((9, 6), float("nan")), torch.full((9, 6), float("nan"))
    factor_a, factor_s = torch.full((6, 6), float("nan")), torch.full((9, 9), float("nan"))
    blocks.add_squared_gradients(diag, a, d, empty, 2**20, fresh=True)
    blocks.add_kronecker_factors(factor_a, factor_s, a, d, empty, 2**20, fresh=True)
    blocks.add_gradient(grad, a, d, empty, 2**20, fresh=True)
    assert all(bool((t == 0).all()) for t in (diag, grad, factor_a, factor_s))


def test_token_layout():
    tokens = Tokens.from_mask(MASK, *MASK.shape)
    assert tokens.per_example[0] == slice(0, 5) and tokens.per_example[1] == slice(2, 7)
    assert torch.equal(tokens.per_example[2], torch.tensor([0, 1, 3, 5, 6]))
    assert tokens.per_example[3] == slice(0, 0) and tokens.per_example[4] == slice(0, 7)
    assert tokens.count == int(MASK.sum()) and torch.equal(tokens.flat, MASK.reshape(-1).nonzero().squeeze(1))
    full = Tokens.from_mask(None, 2, 3)
    assert full.flat is None and full.count == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bound", [1, 7, 40, 2**20])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("widths", [(6, 9), (32, 40)], ids=["narrow", "wide"])
def test_blocks_match_reference(dtype, bound, transposed, widths):
    d_in, d_out = widths
    a, d = layer_batch(d_in, d_out, dtype=dtype)
    if transposed:  # non-contiguous activations take the per-example path
        a = a.transpose(0, 1).contiguous().transpose(0, 1)
    tokens = Tokens.from_mask(MASK, *MASK.shape)
    ref = reference(a, d, MASK)
    diag = torch.zeros(d_out, d_in)
    blocks.add_squared_gradients(diag, a, d, tokens, bound)
    factor_a, factor_s, grad = torch.zeros(d_in, d_in), torch.zeros(d_out, d_out), torch.zeros(d_out, d_in)
    blocks.add_kronecker_factors(factor_a, factor_s, a, d, tokens, bound)
    blocks.add_gradient(grad, a, d, tokens, bound)
    for actual, key in [(diag, "diagonal"), (factor_a, "A"), (factor_s, "S"), (grad, "gradient")]:
        torch.testing.assert_close(actual.double(), ref[key], rtol=1e-5, atol=1e-5)
    # A fresh (uninitialised) accumulator is overwritten by the first contribution, not added to.
    fresh = {
        k: torch.full_like(v, float("nan"))
        for k, v in [("d", diag), ("A", factor_a), ("S", factor_s), ("g", grad)]
    }
    blocks.add_squared_gradients(fresh["d"], a, d, tokens, bound, fresh=True)
    blocks.add_kronecker_factors(fresh["A"], fresh["S"], a, d, tokens, bound, fresh=True)
    blocks.add_gradient(fresh["g"], a, d, tokens, bound, fresh=True)
    for key, expected in [("d", diag), ("A", factor_a), ("S", factor_s), ("g", grad)]:
        torch.testing.assert_close(fresh[key], expected, rtol=1e-5, atol=1e-6)
    # Wide layers on short sequences take the batched ghost norm unless the bound is below T².
    trace = blocks.squared_norms(a, d, tokens, bound)
    assert float(trace) == pytest.approx(float(ref["trace"]), rel=1e-5)
    batched = blocks._batched_ghost_norms(a, d, tokens, bound)
    assert float(batched) == pytest.approx(float(ref["trace"]), rel=1e-5)
    # Both per-example ways to a squared norm, whichever the cost model would pick.
    for n, selection in enumerate(tokens.per_example):
        expected = float(reference(a[n : n + 1], d[n : n + 1], MASK[n : n + 1])["trace"])
        if blocks._size(selection) == 0:
            continue
        ghost = blocks._ghost_norm([(a[n], d[n], selection)], d_in, d_out, bound)
        direct = blocks._direct_norm([(a[n], d[n], selection)], d_in, d_out, bound)
        assert float(ghost) == pytest.approx(expected, rel=1e-5)
        assert float(direct) == pytest.approx(expected, rel=1e-5)


def layer_calls(d_in, d_out, dtype=torch.float32):
    """Three calls of one layer on the batch of MASK: the full mask, one token per example, and every
    second position of the mask (a different length, with holes)."""
    calls = []
    for seed, mask in enumerate([MASK, torch.ones(MASK.shape[0], 1, dtype=torch.long), MASK[:, ::2]]):
        g = torch.Generator().manual_seed(10 + seed)
        a = torch.randn(*mask.shape, d_in, generator=g).to(dtype)
        d = torch.randn(*mask.shape, d_out, generator=g).to(dtype)
        calls.append((a, d, mask))
    return calls


def calls_reference(calls):
    """G_n summed over the calls (each call's real tokens), then squared: float64."""
    grads = sum(torch.einsum("bti,btj->bij", (d.double() * m.unsqueeze(-1)), a.double()) for a, d, m in calls)
    return {"diagonal": (grads**2).sum(0), "trace": (grads**2).sum()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bound", [1, 7, 40, 2**20])
@pytest.mark.parametrize("widths", [(6, 9), (32, 40)], ids=["narrow", "wide"])
def test_squares_over_calls_sum_every_call_before_squaring(dtype, bound, widths):
    d_in, d_out = widths
    raw = layer_calls(d_in, d_out, dtype)
    calls = [(a, d, Tokens.from_mask(m, *m.shape)) for a, d, m in raw]
    ref = calls_reference(raw)
    diag = torch.full((d_out, d_in), float("nan"))
    blocks.add_squared_gradients_over_calls(diag, calls, bound, fresh=True)
    torch.testing.assert_close(diag.double(), ref["diagonal"], rtol=1e-5, atol=1e-5)
    blocks.add_squared_gradients_over_calls(diag, calls, bound)
    torch.testing.assert_close(diag.double(), 2 * ref["diagonal"], rtol=1e-5, atol=1e-5)
    assert float(blocks.squared_norms_over_calls(calls, bound)) == pytest.approx(
        float(ref["trace"]), rel=1e-5
    )
    # Both per-example forms across calls, whichever the cost model would pick.
    for n in range(MASK.shape[0]):
        segments = blocks._segments(calls, n)
        expected = float(
            calls_reference([(a[n : n + 1], d[n : n + 1], m[n : n + 1]) for a, d, m in raw])["trace"]
        )
        if not segments:
            assert expected == 0
            continue
        assert float(blocks._ghost_norm(segments, d_in, d_out, bound)) == pytest.approx(expected, rel=1e-5)
        assert float(blocks._direct_norm(segments, d_in, d_out, bound)) == pytest.approx(expected, rel=1e-5)
    # Squaring each call's G_n separately, what a hook per call did, is a different number.
    separate = sum(calls_reference([call])["trace"] for call in raw)
    assert abs(float(separate) - float(ref["trace"])) > 1e-3 * float(ref["trace"])


@pytest.mark.parametrize("bound", [60, 200, 1000])
def test_squares_over_calls_stay_under_the_bound(bound):
    calls = [(a, d, Tokens.from_mask(m, *m.shape)) for a, d, m in layer_calls(32, 40, torch.bfloat16)]
    acc = torch.zeros(40, 32)
    with LargestNewTensor() as mode:
        blocks.add_squared_gradients_over_calls(acc, calls, bound)
        blocks.squared_norms_over_calls(calls, bound)
    assert mode.largest <= max(bound, 40)


class LargestNewTensor(TorchDispatchMode):
    """Largest number of elements of any tensor an op allocates (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bound", [60, 200, 1000])
def test_batched_ghost_norm_stays_under_the_bound(dtype, bound):
    a, d = layer_batch(32, 40, dtype=dtype)
    tokens = Tokens.from_mask(MASK, *MASK.shape)
    with LargestNewTensor() as mode:
        trace = blocks.squared_norms(a, d, tokens, bound)
    assert mode.largest <= max(bound, 40)
    assert float(trace) == pytest.approx(float(reference(a, d, MASK)["trace"]), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunking_keeps_every_block_under_the_bound(monkeypatch, dtype):
    """A wide-ish layer on long sequences (scaled down from 4096×4096 on 2048 tokens), bound 4096."""
    width, seq_len, bound = 96, 300, 4096
    torch.manual_seed(0)
    model = _SyntheticLayer(width).to(dtype)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, seq_len, dtype=torch.long)
    mask[0, 250:] = 0  # right padding
    mask[1, 100:140] = 0  # a hole: gathered copies instead of views
    batch = {
        "input_ids": torch.randn(2, seq_len, width, generator=g).to(dtype),
        "attention_mask": mask,
        "labels": torch.randint(0, width, (2, seq_len), generator=g),
    }
    largest = []
    accumulate = _Accumulator.accumulate

    def watched(self, name, calls, **kwargs):
        for kind in self.kinds:  # the accumulators (statistic-sized, allocated once) are not blocks
            self._sum(kind, name)
        with LargestNewTensor() as mode:
            accumulate(self, name, calls, **kwargs)
        largest.append(mode.largest)

    for statistic in ("diagonal", "trace", "kfac"):
        unbounded = estimate_fisher(model, [batch], statistic=statistic, with_gradient=True, progress=False)
        with monkeypatch.context() as m:
            m.setattr(_Accumulator, "accumulate", watched)
            bounded = estimate_fisher(
                model,
                [batch],
                statistic=statistic,
                with_gradient=True,
                max_chunk_elements=bound,
                progress=False,
            )
        assert largest and max(largest) <= bound, (statistic, max(largest))
        largest.clear()
        for name in bounded.shapes:
            torch.testing.assert_close(
                bounded.gradients[name], unbounded.gradients[name], rtol=1e-4, atol=1e-6
            )
        assert bounded.scores("trace") == pytest.approx(unbounded.scores("trace"), rel=1e-4)
        if statistic == "kfac":
            for x, y in zip(bounded.kfac["blocks.0"], unbounded.kfac["blocks.0"], strict=True):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
        if statistic == "diagonal":
            torch.testing.assert_close(
                bounded.diagonal["blocks.0"], unbounded.diagonal["blocks.0"], rtol=1e-4, atol=0
            )


def test_peak_memory_function_runs_on_a_small_layer():
    peak = synthetic_layer_memory(width=64, seq_len=32, batch_size=2)
    assert peak.plain_bytes >= 0 and peak.fisher_bytes >= 0 and peak.method
    # A peak too small for the sampler to see reads 0 bytes: the ratio is then undefined, not a crash.
    if peak.plain_bytes:
        assert peak.ratio == peak.fisher_bytes / peak.plain_bytes
    else:
        assert math.isnan(peak.ratio)
