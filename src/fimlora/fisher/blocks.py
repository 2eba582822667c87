"""The per-layer arithmetic of a Fisher pass, in blocks of bounded size.

Inputs are one layer's activations ``a`` (B, T, d_in) and output gradients ``δ`` (B, T, d_out) for a
batch, as the hooks of :mod:`fimlora.fisher.estimator` receive them, and ``Tokens``: which positions are
real (not padding). Example n's weight gradient is G_n = Σ_t δ_{n,t} a_{n,t}ᵀ over its real tokens.

A layer that runs several times in one forward pass (a block shared across depth, a tied weight) has
one such ``Call`` per run, and G_n sums the tokens of all of them: the ``*_over_calls`` functions square
that sum. Sums over tokens (K-FAC factors, the gradient) need no such care: adding each call's share is
already exact.

Memory is bounded by chunking over examples, output rows and tokens: every tensor these functions
create (gradient blocks, Gram blocks, float32 or gathered copies of token chunks) holds at most
max(``max_elements``, d_in, d_out) elements, whatever T and B are (one row or one token is the
smallest piece); accumulators are updated in place. The only other allocations are per batch: the
index tensors of ``Tokens`` (B·T integers) and one scalar per example. Slices of ``a`` and ``δ`` are
used as views where they can be (float32 input, padding only at either end of a sequence), so the
common case copies nothing and chunks tokens only for the Gram blocks of the ghost norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# A token selection: a contiguous range of positions, or the positions listed in an index tensor.
Selection = slice | torch.Tensor


@dataclass(frozen=True)
class Tokens:
    """The real (unpadded) positions of a (B, T) batch.

    ``per_example[n]`` selects example n's positions; ``flat`` indexes the real positions of the
    flattened (B·T) batch and ``mask`` (B, T) is 1.0 on them, 0.0 elsewhere (both ``None`` when every
    position is real); ``count`` is their number.
    """

    per_example: list[Selection]
    flat: torch.Tensor | None
    mask: torch.Tensor | None
    count: int

    @classmethod
    def from_mask(cls, mask: torch.Tensor | None, batch: int, length: int) -> Tokens:
        """From an attention mask (B, T) (nonzero = real); ``None`` means every position is real."""
        if mask is None or bool(mask.all()):
            return cls([slice(0, length)] * batch, None, None, batch * length)
        real = mask.bool()
        lengths = real.sum(dim=1)
        first = real.int().argmax(dim=1)
        # A sequence is contiguous when its real positions form at most one run (left or right padding).
        runs = (real[:, 1:] & ~real[:, :-1]).sum(dim=1) + real[:, 0].int()
        selections: list[Selection] = []
        for n, (start, count, run) in enumerate(
            zip(first.tolist(), lengths.tolist(), runs.tolist(), strict=True)
        ):
            if run <= 1:
                selections.append(slice(start, start + count))
            else:
                selections.append(real[n].nonzero().squeeze(1))
        flat = real.reshape(-1).nonzero().squeeze(1)
        return cls(selections, flat, real.to(torch.float32), int(lengths.sum()))


# One run of a layer in a batch: its inputs (B, T, d_in), output gradients (B, T, d_out) and real tokens.
Call = tuple[torch.Tensor, torch.Tensor, Tokens]
# One example's tokens in one call: inputs (T, d_in), output gradients (T, d_out), the real positions.
Segment = tuple[torch.Tensor, torch.Tensor, Selection]


def _segments(calls: list[Call], n: int) -> list[Segment]:
    """Example n's non-empty segments, one per call."""
    out = []
    for a, d, tokens in calls:
        selection = tokens.per_example[n]
        if _size(selection):
            out.append((a[n], d[n], selection))
    return out


def _size(selection: Selection) -> int:
    if isinstance(selection, slice):
        return selection.stop - selection.start
    return int(selection.numel())


def _split(selection: Selection, size: int) -> list[Selection]:
    """``selection`` cut into consecutive pieces of at most ``size`` positions."""
    total = _size(selection)
    if isinstance(selection, slice):
        return [
            slice(selection.start + i, min(selection.start + i + size, selection.stop))
            for i in range(0, total, size)
        ]
    return [selection[i : i + size] for i in range(0, total, size)]


def _take(x: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Rows of x (T, d) at ``selection``, as float32 (a view when no copy is needed)."""
    rows = x[selection] if isinstance(selection, slice) else x.index_select(0, selection)
    return rows.float()


def _copies(x: torch.Tensor, selection: Selection) -> bool:
    return x.dtype != torch.float32 or not isinstance(selection, slice)


def _gradient_blocks(
    segments: list[Segment], buffer: torch.Tensor, max_elements: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """G_n = Σ_t δ_t a_tᵀ of one example over its ``segments``, as ``(r0, r1, G_n[r0:r1])`` blocks of rows.

    Each block is written into ``buffer`` (rows, d_in), reused for the next block: consume it first.
    Without copies and with one segment it is one matmul per block over the example's tokens; otherwise
    the tokens are taken in chunks whose float32 copies stay under the bound, and added up.
    """
    d_out, d_in = segments[0][1].shape[-1], segments[0][0].shape[-1]
    rows = buffer.shape[0]
    pieces: list[Segment] = []
    for a_n, d_n, selection in segments:
        if _copies(a_n, selection) or _copies(d_n, selection):
            chunks = _split(selection, max(1, max_elements // max(d_in, rows)))
        else:
            chunks = [selection]
        pieces.extend((a_n, d_n, chunk) for chunk in chunks)
    for r0 in range(0, d_out, rows):
        r1 = min(r0 + rows, d_out)
        block = buffer[: r1 - r0]
        if len(pieces) == 1:
            a_n, d_n, chunk = pieces[0]
            torch.mm(_take(d_n[:, r0:r1], chunk).T, _take(a_n, chunk), out=block)
        else:
            block.zero_()
            for a_n, d_n, chunk in pieces:
                block.addmm_(_take(d_n[:, r0:r1], chunk).T, _take(a_n, chunk))
        yield r0, r1, block


def _row_buffer(d_in: int, d_out: int, max_elements: int, device: torch.device) -> torch.Tensor:
    rows = max(1, min(d_out, max_elements // d_in))
    return torch.empty(rows, d_in, dtype=torch.float32, device=device)


def add_squared_gradients(
    acc: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    tokens: Tokens,
    max_elements: int,
    *,
    fresh: bool = False,
) -> None:
    """``acc`` (d_out, d_in) += Σ_n G_n ⊙ G_n over the batch (``fresh``: acc is uninitialised, so =).

    One example at a time, G_n in blocks of output rows: a matmul into a reused buffer, then one fused
    ``addcmul_``. Squaring a whole (examples, d_out, d_in) block and reducing it over examples reads and
    writes it three more times; on CPU that was most of the cost.
    """
    d_out, d_in = acc.shape
    buffer = _row_buffer(d_in, d_out, max_elements, acc.device)
    whole = buffer.shape[0] == d_out and a.dtype == d.dtype == torch.float32
    for n, selection in enumerate(tokens.per_example):
        if whole and isinstance(selection, slice):
            # The common case, kept to four tensor calls: Python overhead per example and layer is
            # otherwise a tenth of the pass on small models.
            if selection.stop > selection.start:
                if fresh:
                    torch.mm(d[n, selection].T, a[n, selection], out=acc).square_()
                    fresh = False
                else:
                    torch.mm(d[n, selection].T, a[n, selection], out=buffer)
                    acc.addcmul_(buffer, buffer)
        elif _size(selection):
            if fresh:
                acc.zero_()
                fresh = False
            for r0, r1, block in _gradient_blocks([(a[n], d[n], selection)], buffer, max_elements):
                acc[r0:r1].addcmul_(block, block)
    if fresh:
        acc.zero_()


def add_squared_gradients_over_calls(
    acc: torch.Tensor, calls: list[Call], max_elements: int, *, fresh: bool = False
) -> None:
    """``acc`` (d_out, d_in) += Σ_n G_n ⊙ G_n, G_n summed over the tokens of every call before squaring.

    Example by example, G_n in blocks of output rows (each the sum of every call's δ aᵀ over its real
    tokens), so nothing beyond one row block is created, whatever the number of calls.
    """
    d_out, d_in = acc.shape
    if fresh:
        acc.zero_()
    buffer = _row_buffer(d_in, d_out, max_elements, acc.device)
    for n in range(calls[0][0].shape[0]):
        segments = _segments(calls, n)
        if segments:
            for r0, r1, block in _gradient_blocks(segments, buffer, max_elements):
                acc[r0:r1].addcmul_(block, block)


def squared_norms(a: torch.Tensor, d: torch.Tensor, tokens: Tokens, max_elements: int) -> torch.Tensor:
    """Σ_n ‖G_n‖_F² over the batch, as a float64 scalar tensor, without forming G_n when cheaper.

    For T tokens, the ghost norm ‖Σ_t δ_t a_tᵀ‖² = Σ_{t,t'} (δ_t·δ_t')(a_t·a_t') costs ~T²(d_in + d_out)
    multiply-adds, forming G_n costs ~T·d_in·d_out: whichever is smaller is used. Short sequences take
    the ghost norm for a chunk of examples at once (two batched Gram products, padding masked out of
    their product); longer ones go example by example, the ghost form over token blocks (i ≤ j,
    off-diagonal blocks counted twice) so that each Gram block holds at most ``max_elements``.
    """
    length, d_in, d_out = a.shape[1], a.shape[-1], d.shape[-1]
    # Per example, the batched form holds T×T products and, for other dtypes, float32 copies of a and δ.
    per_example = length * (length if a.dtype == d.dtype == torch.float32 else max(length, d_in, d_out))
    if length * (d_in + d_out) < d_in * d_out and per_example <= max_elements:
        return _batched_ghost_norms(a, d, tokens, max_elements)
    return squared_norms_over_calls([(a, d, tokens)], max_elements)


def squared_norms_over_calls(calls: list[Call], max_elements: int) -> torch.Tensor:
    """Σ_n ‖G_n‖_F², G_n summed over the tokens of every call, example by example (float64 scalar).

    An example's tokens in all calls are one token axis: the ghost norm runs over the Gram blocks of
    every pair of its token chunks, across calls; the direct form adds every call's δ aᵀ into G_n.
    Whichever costs fewer multiply-adds for the example's total token count is used.
    """
    a0, d0, _ = calls[0]
    d_in, d_out = a0.shape[-1], d0.shape[-1]
    parts: list[torch.Tensor] = []
    for n in range(a0.shape[0]):
        segments = _segments(calls, n)
        size = sum(_size(selection) for _, _, selection in segments)
        if size == 0:
            continue
        if size * (d_in + d_out) < d_in * d_out:
            parts.append(_ghost_norm(segments, d_in, d_out, max_elements))
        else:
            parts.append(_direct_norm(segments, d_in, d_out, max_elements))
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=a0.device)
    return torch.stack(parts).double().sum()


def _batched_ghost_norms(a: torch.Tensor, d: torch.Tensor, tokens: Tokens, max_elements: int) -> torch.Tensor:
    """Σ_n Σ_{t,t'} m_t m_t' (δ_t·δ_t')(a_t·a_t') for chunks of examples (m: the real-token mask)."""
    batch, length = a.shape[0], a.shape[1]
    per_example = length * (
        length if a.dtype == d.dtype == torch.float32 else max(length, a.shape[-1], d.shape[-1])
    )
    chunk = max(1, max_elements // per_example)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, batch, chunk):
        a_c, d_c = a[start : start + chunk].float(), d[start : start + chunk].float()
        product = torch.bmm(a_c, a_c.transpose(1, 2))
        product.mul_(torch.bmm(d_c, d_c.transpose(1, 2)))
        if tokens.mask is not None:
            m = tokens.mask[start : start + chunk]
            product.mul_(m.unsqueeze(2) * m.unsqueeze(1))
        total += product.sum(dtype=torch.float64)
    return total


def _ghost_norm(segments: list[Segment], d_in: int, d_out: int, max_elements: int) -> torch.Tensor:
    """‖Σ_t δ_t a_tᵀ‖² over one example's segments, by Gram blocks of token chunks (i ≤ j, i < j twice)."""
    block = max(1, math.isqrt(max_elements))
    if any(_copies(a_n, sel) or _copies(d_n, sel) for a_n, d_n, sel in segments):
        block = min(block, max(1, max_elements // max(d_in, d_out)))
    chunks = [(a_n, d_n, chunk) for a_n, d_n, sel in segments for chunk in _split(sel, block)]
    total = segments[0][0].new_zeros((), dtype=torch.float32)
    for i, (a_n, d_n, ci) in enumerate(chunks):
        a_i, d_i = _take(a_n, ci), _take(d_n, ci)
        for j in range(i, len(chunks)):
            if j == i:
                a_j, d_j = a_i, d_i
            else:
                a_m, d_m, cj = chunks[j]
                a_j, d_j = _take(a_m, cj), _take(d_m, cj)
            gram_a, gram_d = a_i @ a_j.T, d_i @ d_j.T
            total += (1.0 if j == i else 2.0) * torch.dot(gram_a.view(-1), gram_d.view(-1))
    return total


def _direct_norm(segments: list[Segment], d_in: int, d_out: int, max_elements: int) -> torch.Tensor:
    """‖G_n‖² of one example by forming G_n in blocks of output rows over its segments."""
    buffer = _row_buffer(d_in, d_out, max_elements, segments[0][0].device)
    total = segments[0][0].new_zeros((), dtype=torch.float32)
    for _, _, block in _gradient_blocks(segments, buffer, max_elements):
        flat = block.view(-1)
        total += torch.dot(flat, flat)
    return total


def _flat_chunks(
    a: torch.Tensor, d: torch.Tensor, tokens: Tokens, max_elements: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(a, δ) rows of every real token of the batch, in float32 chunks of bounded size."""
    d_in, d_out = a.shape[-1], d.shape[-1]
    if not (a.is_contiguous() and d.is_contiguous()):
        for n, selection in enumerate(tokens.per_example):
            for chunk in _split(selection, max(1, max_elements // max(d_in, d_out))):
                yield _take(a[n], chunk), _take(d[n], chunk)
        return
    a_flat, d_flat = a.view(-1, d_in), d.view(-1, d_out)
    if tokens.flat is None and a.dtype == d.dtype == torch.float32:
        yield a_flat, d_flat
        return
    everything = slice(0, a_flat.shape[0]) if tokens.flat is None else tokens.flat
    for chunk in _split(everything, max(1, max_elements // max(d_in, d_out))):
        yield _take(a_flat, chunk), _take(d_flat, chunk)


def add_kronecker_factors(
    a_acc: torch.Tensor,
    s_acc: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    tokens: Tokens,
    max_elements: int,
    *,
    fresh: bool = False,
) -> None:
    """``a_acc`` (d_in, d_in) += Σ_{n,t} a aᵀ; ``s_acc`` (d_out, d_out) += Σ_{n,t} δ δᵀ (real tokens).

    ``fresh``: the accumulators are uninitialised, so = instead of +=.
    """
    for a_c, d_c in _flat_chunks(a, d, tokens, max_elements):
        _add_product(a_acc, a_c.T, a_c, fresh)
        _add_product(s_acc, d_c.T, d_c, fresh)
        fresh = False
    if fresh:
        a_acc.zero_()
        s_acc.zero_()


def add_gradient(
    acc: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    tokens: Tokens,
    max_elements: int,
    *,
    fresh: bool = False,
) -> None:
    """``acc`` (d_out, d_in) += Σ_n G_n = Σ_{n,t} δ aᵀ over real tokens (one matmul without padding).

    ``fresh``: acc is uninitialised, so = instead of +=.
    """
    for a_c, d_c in _flat_chunks(a, d, tokens, max_elements):
        _add_product(acc, d_c.T, a_c, fresh)
        fresh = False
    if fresh:
        acc.zero_()


def _add_product(acc: torch.Tensor, x: torch.Tensor, y: torch.Tensor, overwrite: bool) -> None:
    if overwrite:
        torch.mm(x, y, out=acc)
    else:
        acc.addmm_(x, y)
