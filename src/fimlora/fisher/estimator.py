"""Fisher statistics of frozen linear weights from one batched pass: exact per example, no per-example loop.

For a linear layer y = W a, example n's weight gradient is G_n = Σ_t δ_{n,t} a_{n,t}ᵀ, where a_{n,t} is the
layer's input at token t and δ_{n,t} = ∂ℓ_n/∂y_{n,t}. Because examples do not interact in a forward pass
(eval mode, no batch norm), back-propagating Σ_n ℓ_n gives every δ_{n,t} at once. A forward hook keeps
a; a tensor hook on y receives δ during the backward pass and hands (a, δ) to
:mod:`fimlora.fisher.blocks`, which adds the batch's share of the statistic to the module's accumulator:

    diagonal  F      = (1/N) Σ_n G_n ⊙ G_n
    trace     tr F   = (1/N) Σ_n ‖G_n‖_F²                 (ghost norm: G_n is not formed when that is cheaper)
    kfac      A      = (1/M) Σ_{n,t} a_{n,t} a_{n,t}ᵀ,  S = (1/N) Σ_{n,t} δ_{n,t} δ_{n,t}ᵀ
    gradient  Ḡ      = (1/N) Σ_n G_n                       (optional, with any statistic)

A layer that runs more than once in a forward pass (a block shared across depth as in ALBERT, a tied
weight) has G_n = Σ over the tokens of all its calls: its calls are kept until the last δ arrives and
squared together. A layer fed tokens flattened to (B·T, d_in) is mapped back to (example, token); a
layer whose inputs cannot be attributed to examples (e.g. the tokens routed to an expert) is an error.

Weight gradients are never formed by autograd and nothing accumulates into ``weight.grad``: all
parameters are frozen during the pass, and autograd only propagates δ through the network, as a
frozen-weight backward already does. Under ``torch.distributed`` every rank sums its accumulators and
counts with the others before normalising, so all ranks return the same result.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from fimlora.errors import FimloraError
from fimlora.fisher import blocks
from fimlora.fisher.blocks import Tokens
from fimlora.fisher.distributed import all_reduce_sum, rank_and_world_size
from fimlora.fisher.losses import CausalLMHead, per_example_loss, sample_model_labels
from fimlora.fisher.result import STATISTICS, FisherResult
from fimlora.models import linear_modules, resolve_target_modules, transformer_blocks
from fimlora.quantization import keep_unpacked

ESTIMATORS = ("empirical", "mc")

# Bound on every temporary block the pass materialises (elements): 2**20 float32 = 4 MiB keeps a block
# in cache while it is squared and summed, and keeps memory flat for wide layers and long sequences.
DEFAULT_MAX_CHUNK_ELEMENTS = 2**20


class _Accumulator:
    """Forward hooks on the target layers; tensor hooks on their outputs add (a, δ)'s share to the sums.

    ``phase`` says what the next backward pass is for: ``"both"`` (the statistic and, if asked, the
    gradient), ``"statistic"`` or ``"gradient"`` (the Monte-Carlo estimator with a gradient needs a
    second backward with the data's labels).

    Each call of a layer is attributed to the batch's examples and tokens by its input's shape (see
    :meth:`_attribute`). A layer that ran once in the forward pass is accumulated as soon as its δ
    arrives. A layer that ran k > 1 times (a block shared across depth, a tied weight) adds each call's
    token sums (K-FAC factors, gradient) at once, but keeps its calls until the k-th δ arrives: its
    squared statistics need G_n summed over every call first. Calls whose δ never arrives (outputs the
    loss does not use) have δ = 0 and are squared with the others when the backward pass ends.
    """

    def __init__(
        self, modules: Mapping[str, nn.Linear], statistic: str, with_gradient: bool, max_chunk_elements: int
    ) -> None:
        self.modules = dict(modules)
        self.statistic = statistic
        # Statistics that square G_n (the others are sums over tokens).
        self.squares = statistic in ("diagonal", "trace")
        self.max_chunk_elements = max_chunk_elements
        self.phase = "both"
        self.batch_size = 0
        self.length = 0
        self.attention_mask: torch.Tensor | None = None
        self.leaves: list[torch.Tensor] = []
        self.calls = dict.fromkeys(self.modules, 0)
        self._waiting: dict[str, list[blocks.Call]] = {}
        self._tokens: dict[tuple[int, int], Tokens] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        kinds = {"diagonal": ["diagonal"], "trace": ["trace"], "kfac": ["kfac.A", "kfac.S"]}[statistic]
        self.kinds = kinds + (["gradient"] if with_gradient else [])
        # Sums are allocated when first needed: a weight-sized accumulator that exists only from the
        # first backward on does not add to the forward pass's peak (what a plain weight.grad costs).
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.tokens = dict.fromkeys(self.modules, 0)
        # True while a checkpointed block's forward pass is recomputed for its backward pass.
        self.recomputing = False

    def _sum(self, kind: str, name: str) -> torch.Tensor:
        """The accumulator of ``kind`` for module ``name``, zero-filled when new (see ``_fresh_sum``)."""
        tensor, fresh = self._fresh_sum(kind, name)
        if fresh:
            tensor.zero_()
        return tensor

    def _fresh_sum(self, kind: str, name: str) -> tuple[torch.Tensor, bool]:
        """The accumulator, and whether it is still uninitialised (the caller then writes, not adds).

        Writing the first contribution instead of adding it to zeros saves two passes over a weight-sized
        tensor: with one small batch (a quick calibration, the benchmarks' batch-1 cases) that is a visible
        share of the whole pass.
        """
        key = (kind, name)
        if key in self.sums:
            return self.sums[key], False
        module = self.modules[name]
        shape = {
            "diagonal": (module.out_features, module.in_features),
            "gradient": (module.out_features, module.in_features),
            "kfac.A": (module.in_features, module.in_features),
            "kfac.S": (module.out_features, module.out_features),
            "trace": (),
        }[kind]
        dtype = torch.float64 if kind == "trace" else torch.float32
        self.sums[key] = torch.empty(shape, dtype=dtype, device=module.weight.device)
        return self.sums[key], True

    def __enter__(self) -> _Accumulator:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start_batch(self, batch_size: int, length: int, attention_mask: torch.Tensor | None) -> None:
        """A batch of ``batch_size`` examples of ``length`` positions; ``attention_mask`` (B, T) or None."""
        self.batch_size, self.length = batch_size, length
        if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, length):
            attention_mask = None
        self.attention_mask = attention_mask
        self.leaves = []
        self.calls = dict.fromkeys(self.modules, 0)
        self._waiting = {}
        self._tokens = {}

    @contextmanager
    def recomputation(self) -> Iterator[None]:
        """A checkpointed block's forward pass, run again to recompute what its backward pass needs."""
        self.recomputing = True
        try:
            yield
        finally:
            self.recomputing = False

    def _forward_hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if self.recomputing:
                # This call was counted and hooked when it first ran; the recomputation builds the same
                # graph (the same leaf in place of an output that needs no gradient) and nothing more.
                return None if output.requires_grad else output.detach().requires_grad_(True)
            activation = args[0].detach()
            repeat = self._attribute(name, activation.shape)
            self.calls[name] += 1
            replaced = None
            if not output.requires_grad:
                # The first adapted layers see inputs that do not require grad (every parameter is
                # frozen): make their outputs leaves so δ still flows back to them.
                replaced = output.detach().requires_grad_(True)
                self.leaves.append(replaced)
                output = replaced
            output.register_hook(lambda delta: self._receive(name, activation, delta, repeat))
            return replaced

        return hook

    def _attribute(self, name: str, shape: torch.Size) -> int:
        """How a call's positions map to the batch's (example, token): how many positions each token has.

        With B examples of T tokens, inputs shaped (B, …, d_in) are example-major, as they always were:
        their positions are the mask's tokens when there are T of them (1 is returned), otherwise all
        real (0: a pooled vector, another sequence's length). Inputs whose leading size is B·T are tokens
        flattened inside a block, example-major: (B·T, …, d_in) maps back to (B, T·r, d_in), each token's
        r positions masked with it (r is returned). Any other layout cannot be attributed to examples.
        """
        batch, length = self.batch_size, self.length
        lead = shape[0] if len(shape) >= 2 else None
        if lead == batch:
            return 1 if math.prod(shape[1:-1]) == length else 0
        if lead == batch * length:
            return math.prod(shape[1:-1])
        raise FimloraError(
            f"The Fisher cannot attribute the inputs of {name!r} (shape {tuple(shape)}) to the batch's "
            f"{batch} examples × {length} tokens: their leading size is neither {batch} nor {batch * length} "
            "(e.g. only the tokens routed to an expert). Leave this layer out with target_modules."
        )

    def _real_tokens(self, positions: int, repeat: int) -> Tokens:
        """Real positions of a (B, positions) call whose tokens have ``repeat`` positions each (0: all)."""
        key = (positions, repeat)
        if key not in self._tokens:
            mask = self.attention_mask if repeat else None
            if mask is not None and repeat > 1:
                mask = mask.repeat_interleave(repeat, dim=1)
            self._tokens[key] = Tokens.from_mask(mask, self.batch_size, positions)
        return self._tokens[key]

    def _receive(self, name: str, activation: torch.Tensor, delta: torch.Tensor, repeat: int) -> None:
        """The δ of one call of layer ``name``: accumulate it, or keep it until its layer's last call."""
        batch = self.batch_size
        a = activation.reshape(batch, -1, activation.shape[-1])
        d = delta.detach().reshape(batch, -1, delta.shape[-1])
        tokens = self._real_tokens(a.shape[1], repeat)
        if self.calls[name] == 1:
            self.accumulate(name, [(a, d, tokens)])
            return
        self.accumulate(name, [(a, d, tokens)], squares=False)
        if self.squares and self.phase != "gradient":
            waiting = self._waiting.setdefault(name, [])
            waiting.append((a, d, tokens))
            if len(waiting) == self.calls[name]:
                del self._waiting[name]
                self.accumulate(name, waiting, sums=False)

    def end_backward(self) -> None:
        """Square what layers whose other calls' δ never arrived hold (those calls have δ = 0)."""
        waiting, self._waiting = self._waiting, {}
        for name, calls in waiting.items():
            self.accumulate(name, calls, sums=False)

    def accumulate(
        self, name: str, calls: list[blocks.Call], *, squares: bool = True, sums: bool = True
    ) -> None:
        """Add layer ``name``'s share of the batch from ``calls``: its runs' (a, δ, tokens), a (B, T, d_in).

        ``squares``: the squared statistics (diagonal, trace), G_n summed over every call first; ``sums``:
        the per-token sums (K-FAC factors and token count, gradient), call by call.
        """
        bound = self.max_chunk_elements
        if squares and self.phase != "gradient":
            if self.statistic == "diagonal":
                acc, fresh = self._fresh_sum("diagonal", name)
                if len(calls) == 1:
                    blocks.add_squared_gradients(acc, *calls[0], bound, fresh=fresh)
                else:
                    blocks.add_squared_gradients_over_calls(acc, calls, bound, fresh=fresh)
            elif self.statistic == "trace":
                norms = (
                    blocks.squared_norms(*calls[0], bound)
                    if len(calls) == 1
                    else blocks.squared_norms_over_calls(calls, bound)
                )
                self._sum("trace", name).add_(norms)
        if not sums:
            return
        for a, d, tokens in calls:
            if self.statistic == "kfac" and self.phase != "gradient":
                (a_sum, fresh), (s_sum, _) = self._fresh_sum("kfac.A", name), self._fresh_sum("kfac.S", name)
                blocks.add_kronecker_factors(a_sum, s_sum, a, d, tokens, bound, fresh=fresh)
                self.tokens[name] += tokens.count
            if self.phase != "statistic" and "gradient" in self.kinds:
                acc, fresh = self._fresh_sum("gradient", name)
                blocks.add_gradient(acc, a, d, tokens, bound, fresh=fresh)

    def reduce_and_normalise(self, examples: int) -> tuple[int, dict[str, Any]]:
        """Sum every accumulator and count over ranks, then divide in place.

        Returns N and ``{kind: {name: value}}`` for each accumulated kind, plus ``"num_tokens"``.
        """
        names = list(self.modules)
        device = next(iter(self.modules.values())).weight.device
        counts = torch.tensor(
            [examples] + [self.tokens[n] for n in names], dtype=torch.float64, device=device
        )
        # Every rank reduces the same tensors in the same order, including sums it never touched.
        all_reduce_sum([counts] + [self._sum(kind, name) for kind in self.kinds for name in names])
        total = int(counts[0])
        if total == 0:
            raise FimloraError("The calibration dataloader yielded no examples.")
        tokens = dict(zip(names, (int(c) for c in counts[1:]), strict=True))
        out: dict[str, Any] = {
            kind: {
                n: self._sum(kind, n).div_(max(tokens[n], 1) if kind == "kfac.A" else total) for n in names
            }
            for kind in self.kinds
        }
        out["num_tokens"] = max(tokens.values(), default=0)
        self.sums = {}
        return total, out


@contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode (dropout off) and every parameter frozen; both restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextmanager
def _checkpointed_blocks(model: nn.Module, accumulator: _Accumulator) -> Iterator[None]:
    """Every transformer block's activations recomputed in the backward pass instead of kept.

    Each block's forward runs under non-reentrant ``torch.utils.checkpoint`` (what transformers'
    gradient checkpointing uses; transformers' own switch acts only in training mode, and the pass runs
    in eval mode). The backward pass then holds each block's input, not its activations. The recomputed
    activations are the same numbers (the same operations on the same inputs), so the statistics are
    unchanged. The model's KV cache is off meanwhile: a recomputed block would append to it again.
    """
    _, stack = transformer_blocks(model)

    def contexts() -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
        return contextlib.nullcontext(), accumulator.recomputation()

    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    own = [block.__dict__.get("forward") for block in stack]
    for block in stack:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, context_fn=contexts)
    if use_cache:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if use_cache:
            config.use_cache = use_cache  # type: ignore[union-attr]
        for block, forward in zip(stack, own, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _truncate(batch: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    return _slice(batch, 0, keep)


def _slice(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Examples ``start:stop`` of ``batch`` (their padding kept: the same positions as in the batch)."""
    return {k: v[start:stop] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}


def _backward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    accumulator: _Accumulator,
    lm_head: CausalLMHead | None,
    estimator: str,
    two_passes: bool,
    generator: torch.Generator,
    batch_index: int,
) -> None:
    """One forward pass of ``batch`` and the backward pass(es) that add its share to ``accumulator``."""
    labels = batch["labels"]
    accumulator.start_batch(*_batch_shape(batch), batch.get("attention_mask"))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    losses = {}
    if lm_head is None:
        logits = model(**inputs).logits
        if estimator == "empirical" or two_passes:
            losses["gradient" if two_passes else "both"] = per_example_loss(logits, labels)
        if estimator == "mc":
            sampled = sample_model_labels(logits.detach(), labels, generator)
            losses["statistic" if two_passes else "both"] = per_example_loss(logits, sampled)
        # The logits can be as large as everything else together (B·T·V for an LM): let autograd
        # free them as soon as the loss's backward has used them.
        del logits
    else:
        with lm_head.hidden_states():
            hidden = model(**inputs).logits
        if estimator == "empirical" or two_passes:
            losses["gradient" if two_passes else "both"] = lm_head.token_nll(hidden, labels)[0]
        if estimator == "mc":
            sampled = lm_head.sample_labels(hidden, labels, generator)
            losses["statistic" if two_passes else "both"] = lm_head.token_nll(hidden, sampled)[0]
        del hidden
    for phase_losses in losses.values():
        _check_finite(phase_losses, batch_index)
    for i, (phase, phase_losses) in enumerate(losses.items()):
        if accumulator.leaves:
            accumulator.phase = phase
            # autograd.grad, not backward: nothing is kept in the leaves' .grad.
            torch.autograd.grad(
                phase_losses.sum(),
                accumulator.leaves,
                retain_graph=i + 1 < len(losses),
                allow_unused=True,
            )
            accumulator.end_backward()
    accumulator.leaves = []


def _batch_shape(batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(B, T): examples, and positions per example (the attention mask's, else the input ids')."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[0] == ids.shape[0]:
        return int(mask.shape[0]), int(mask.shape[1])
    return int(ids.shape[0]), int(ids.shape[1]) if ids.dim() > 1 else 1


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_finite(losses: torch.Tensor, batch_index: int) -> None:
    if not bool(torch.isfinite(losses).all()):
        raise FimloraError(
            f"Non-finite loss in calibration batch {batch_index}; check the data and the model."
        )


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    target_modules: str | Sequence[str] | None = None,
    estimator: str = "empirical",
    statistic: str = "diagonal",
    with_gradient: bool = False,
    max_examples: int | None = None,
    seed: int = 0,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    examples_per_backward: int | None = None,
    checkpoint_blocks: bool = False,
    progress: bool = True,
) -> FisherResult:
    """Fisher statistics of each target layer's weight, exact per example, from one batched pass.

    Conventions. G_n = ∂ℓ_n/∂W (``d_out × d_in``) is example n's gradient of the frozen weight, ℓ_n its
    loss (:mod:`fimlora.fisher.losses`: classification → cross-entropy of its label; causal LM → the
    **sum** of its token NLLs over positions whose label ≠ -100). N = number of examples. A token is a
    position whose attention mask is nonzero; padded positions contribute to nothing.

    Which positions are example n's tokens, per layer and call, from the input's shape (B examples, T
    = the attention mask's length, else the input ids'): (B, T, …) → the mask's tokens; (B, other, …)
    → positions of example n, all real (e.g. a pooled vector); (B·T, …) → tokens flattened inside a
    block, mapped back to (n, t) and masked. Anything else (e.g. only the tokens routed to an expert)
    raises a ``FimloraError`` naming the layer: leave it out with ``target_modules``. A layer that runs
    k times per forward pass (ALBERT's shared layer, a tied weight) has one token axis per example
    made of all k calls' tokens: G_n sums over them before any square, for every statistic, and M
    counts them. For the squared statistics its k calls' output gradients are held until the last
    arrives (at most k·B·T·d_out more floats per such layer and batch).

    Args:
        model: a Hugging Face model whose forward takes ``input_ids``/``attention_mask`` and returns
            ``logits`` of shape (B, C) (classification) or (B, T, V) (causal LM).
        dataloader: yields dicts with ``input_ids``, ``attention_mask`` and ``labels`` (HF convention:
            causal-LM labels are token ids with -100 on ignored positions, shifted inside the loss).
            Under ``torch.distributed`` each rank passes its own shard (e.g. a ``DistributedSampler``).
        target_modules: as :func:`fimlora.models.resolve_target_modules` (default: every linear layer
            inside the transformer blocks).
        estimator: where the labels of ℓ_n come from: ``"empirical"`` (the data's) or ``"mc"`` (sampled
            from the model's own predictive distribution, per token for LMs, with a generator seeded by
            ``seed``; rank r > 0 of a distributed run uses its own stream, ``seed + r·2³²``).
        statistic: what is accumulated per module:

            - ``"diagonal"``: ``diagonal[name]`` = (1/N) Σ_n G_n ⊙ G_n, float32, shaped like the weight.
            - ``"trace"``: ``traces[name]`` = (1/N) Σ_n ‖G_n‖_F² (a float; no tensors are kept), by the
              ghost norm ‖Σ_t δ_t a_tᵀ‖² = Σ_{t,t'} (δ_t·δ_t')(a_t·a_t') or by forming G_n, whichever
              costs fewer multiply-adds for that example and layer.
            - ``"kfac"``: ``kfac[name]`` = ``(A, S)`` with A = (1/M) Σ_{n,t} a_{n,t} a_{n,t}ᵀ
              (``d_in × d_in``, M = number of tokens: a per-token mean) and S = (1/N) Σ_{n,t} δ_{n,t}
              δ_{n,t}ᵀ (``d_out × d_out``, summed over an example's tokens and averaged over examples).
              This is K-FAC's "expand" convention for weights shared across positions (Eschenhagen et
              al. 2023, arXiv 2311.00636): the Fisher of vec(W), (1/N) Σ_n Σ_{t,t'} (a_t a_t'ᵀ) ⊗
              (δ_t δ_t'ᵀ), loses its cross-token terms (t ≠ t'), and the token average of the Kronecker
              products is replaced by the Kronecker product of the token averages:
              (1/N) Σ_{n,t} (a aᵀ) ⊗ (δ δᵀ) ≈ A ⊗ S. Scores use its diagonal, S_ii·A_jj for weight
              (i, j), i.e. diag(S) diag(A)ᵀ, whose sum is tr(A)·tr(S) (:meth:`FisherResult.scores`).
        with_gradient: also accumulate ``gradients[name]`` = Ḡ = (1/N) Σ_n G_n (``d_out × d_in``,
            float32), the gradient of the mean loss (1/N) Σ_n ℓ_n. Ḡ always uses the **data's** labels:
            under ``estimator="mc"`` its expectation would be zero, so that case runs a second backward
            pass with the data's labels.
        max_examples: stop after this many examples (per rank; the last batch is cut); ``None`` uses
            them all.
        max_chunk_elements: bound (elements) on every temporary block the pass creates: gradient
            blocks, Gram blocks, float32 or gathered copies of token chunks (at least one row or token
            of a layer, see :mod:`fimlora.fisher.blocks`). The accumulators are the statistic's size
            and are allocated at the first backward pass.
        examples_per_backward: back-propagate each batch this many examples at a time (``None``: the
            whole batch). The activations a backward pass holds shrink in proportion (the pass takes
            longer); the statistics are the same up to float round-off, since examples do not interact
            and keep their padded positions.
        checkpoint_blocks: recompute each transformer block's activations in the backward pass rather
            than keep them (activation checkpointing; the same statistics): the pass then holds each
            block's input and the target layers' inputs, one block's activations at a time.
        progress: show a progress bar (rank 0 only).

    Returns:
        ``FisherResult`` with ``statistic``, the field it names, ``gradients`` when asked for,
        ``num_examples`` = N (over all ranks) and ``metadata`` (``seed``; ``num_tokens`` = M for K-FAC;
        ``world_size`` when distributed). The model's train/eval mode and ``requires_grad`` flags are
        restored, and no ``.grad`` is touched.
    """
    if estimator not in ESTIMATORS:
        raise FimloraError(f"Unknown Fisher estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}.")
    if statistic not in STATISTICS:
        raise FimloraError(f"Unknown Fisher statistic {statistic!r}; choose one of {', '.join(STATISTICS)}.")
    if max_examples is not None and max_examples < 1:
        raise FimloraError(f"max_examples must be at least 1, got {max_examples}.")
    if max_chunk_elements < 1:
        raise FimloraError(f"max_chunk_elements must be at least 1, got {max_chunk_elements}.")
    if examples_per_backward is not None and examples_per_backward < 1:
        raise FimloraError(f"examples_per_backward must be at least 1, got {examples_per_backward}.")
    names = resolve_target_modules(model, target_modules)
    # An eval-mode pass would repack a bitsandbytes NF4 base for a CPU-specific kernel (and break training).
    keep_unpacked(model)
    linears = linear_modules(model)
    device = _model_device(model)
    rank, world_size = rank_and_world_size()
    generator = torch.Generator(device=device).manual_seed(seed + (rank << 32))
    two_passes = estimator == "mc" and with_gradient
    seen = 0
    dataset = getattr(dataloader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    if max_examples is not None:
        total = min(total, max_examples) if total is not None else max_examples
    bar = tqdm(
        total=total, desc=f"Fisher {statistic} ({estimator})", unit="ex", disable=not progress or rank != 0
    )
    # A causal LM's loss from its hidden states, its head applied to a chunk of tokens at a time (the
    # batch's B·T·V logits are never held); checked before the hooks exist, so the check is not counted.
    lm_head = CausalLMHead.of(model)
    accumulator = _Accumulator({n: linears[n] for n in names}, statistic, with_gradient, max_chunk_elements)
    checkpointed = _checkpointed_blocks(model, accumulator) if checkpoint_blocks else contextlib.nullcontext()
    with _frozen_eval(model), accumulator, checkpointed, torch.enable_grad():
        for batch_index, raw in enumerate(dataloader):
            if max_examples is not None and seen >= max_examples:
                break
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in raw.items()}
            if max_examples is not None:
                batch = _truncate(batch, max_examples - seen)
            labels = batch["labels"]
            size = int(labels.shape[0])
            step = size if examples_per_backward is None else examples_per_backward
            # Examples do not interact in the pass, so a batch may be back-propagated a slice of
            # examples at a time: the activations held for the backward shrink with the slice.
            for start in range(0, size, step):
                part = batch if step >= size else _slice(batch, start, start + step)
                _backward(model, part, accumulator, lm_head, estimator, two_passes, generator, batch_index)
            seen += size
            bar.update(size)
    bar.close()
    num_examples, stats = accumulator.reduce_and_normalise(seen)
    metadata: dict[str, Any] = {"seed": seed}
    if statistic == "kfac":
        metadata["num_tokens"] = stats["num_tokens"]
    if world_size > 1:
        metadata["world_size"] = world_size
    result = FisherResult(
        diagonal=stats.get("diagonal"),
        num_examples=num_examples,
        estimator=estimator,
        metadata=metadata,
        statistic=statistic,
        traces={n: float(t) for n, t in stats["trace"].items()} if "trace" in stats else None,
        kfac={n: (a, stats["kfac.S"][n]) for n, a in stats["kfac.A"].items()} if "kfac.A" in stats else None,
        gradients=stats.get("gradient"),
        shapes={n: (linears[n].out_features, linears[n].in_features) for n in names},
    )
    result.check_finite()
    return result
