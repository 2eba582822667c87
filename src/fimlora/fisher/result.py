"""What a Fisher pass produced, the per-module scores the allocators read, and its on-disk form.

A ``FisherResult`` holds the statistic the pass was asked for (``statistic``):

- ``"diagonal"``: ``diagonal[name]`` = (1/N) Σ_n G_n ⊙ G_n, shaped like the weight;
- ``"trace"``: ``traces[name]`` = (1/N) Σ_n ‖G_n‖_F², one float per module (no tensors);
- ``"kfac"``: ``kfac[name]`` = ``(A, S)``, the Kronecker factors (see :func:`estimate_fisher`);

and, whatever the statistic, ``gradients[name]`` = Ḡ = (1/N) Σ_n G_n when asked for. G_n = ∂ℓ_n/∂W is
example n's gradient of the frozen weight W (``d_out × d_in``).

On disk a Fisher is two files: ``fisher.safetensors`` and ``fisher.json`` (N, estimator, statistic,
metadata, shapes, traces, the per-module scores). The tensors are float32, keyed by the module's name in
``model.named_modules()`` with a prefix per kind: the diagonal has none (so files written before the other
statistics existed still load), K-FAC factors are ``kfac.A/<name>`` and ``kfac.S/<name>``, gradients
``gradient/<name>``. A trace-only result without gradients writes an empty ``fisher.safetensors``.
Nothing is pickled. ``fisher.json`` records the SHA-256 of ``fisher.safetensors`` (``checksums``), and
:meth:`FisherResult.load` refuses a tensor file that does not match it, or that safetensors cannot read,
with a one-line :class:`FimloraError` (files written before checksums existed load unchecked).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fimlora.errors import FimloraError
from fimlora.io import atomic_write, atomic_write_json, sha256_file

TENSORS_FILE = "fisher.safetensors"
META_FILE = "fisher.json"

STATISTICS = ("diagonal", "trace", "kfac")

# How a module's Fisher becomes one importance number. "trace" (tr F) grows with the module's size,
# "mean" (tr F / numel) does not: with rank cost r·(d_in+d_out), "mean" asks "how important is each
# weight here".
AGGREGATIONS = ("trace", "mean")

_KFAC_A, _KFAC_S, _GRADIENT = "kfac.A/", "kfac.S/", "gradient/"


@dataclass
class FisherResult:
    """One Fisher pass over N calibration examples (see the module docstring for each field's formula).

    Exactly the field of ``statistic`` is set among ``diagonal`` / ``traces`` / ``kfac``; the others are
    ``None``. ``gradients`` is ``None`` unless the pass was asked for it. ``shapes`` maps each module to
    its weight's ``(d_out, d_in)``; it is derived from the tensors when not given (a trace-only result
    must give it).
    """

    diagonal: dict[str, torch.Tensor] | None
    num_examples: int
    estimator: str
    metadata: dict[str, Any] = field(default_factory=dict)
    statistic: str = "diagonal"
    traces: dict[str, float] | None = None
    kfac: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    gradients: dict[str, torch.Tensor] | None = None
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise FimloraError(
                f"Unknown Fisher statistic {self.statistic!r}; choose one of {', '.join(STATISTICS)}."
            )
        held = {"diagonal": self.diagonal, "trace": self.traces, "kfac": self.kfac}
        if held[self.statistic] is None or any(v is not None for k, v in held.items() if k != self.statistic):
            raise ValueError(f"a {self.statistic!r} FisherResult holds exactly its own statistic")
        if not self.shapes:
            self.shapes = _derive_shapes(self)
        self.shapes = {name: (int(s[0]), int(s[1])) for name, s in self.shapes.items()}
        modules = set(self.shapes)
        for kind, values in (*held.items(), ("gradients", self.gradients)):
            if values is not None and set(values) != modules:
                raise ValueError(f"FisherResult: the {kind} and the shapes name different modules")

    def module_traces(self) -> dict[str, float]:
        """tr F per module, in float64 then float.

        ``diagonal``: Σ of the diagonal; ``trace``: the exact trace; ``kfac``: tr(A)·tr(S), the sum of
        the K-FAC diagonal approximation diag(S) diag(A)ᵀ (= the trace of A ⊗ S).
        """
        if self.diagonal is not None:
            return {name: float(d.sum(dtype=torch.float64)) for name, d in self.diagonal.items()}
        if self.traces is not None:
            return dict(self.traces)
        assert self.kfac is not None
        return {
            name: float(a.diagonal().sum(dtype=torch.float64) * s.diagonal().sum(dtype=torch.float64))
            for name, (a, s) in self.kfac.items()
        }

    def scores(self, aggregation: str = "mean") -> dict[str, float]:
        """One importance score per module: ``"trace"`` = tr F, ``"mean"`` = tr F / (d_out·d_in).

        tr F as in :meth:`module_traces`; for the diagonal, ``"mean"`` is the mean of its entries.
        """
        if aggregation not in AGGREGATIONS:
            raise FimloraError(
                f"Unknown Fisher aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}."
            )
        if aggregation == "mean" and self.diagonal is not None:
            return {name: float(d.mean(dtype=torch.float64)) for name, d in self.diagonal.items()}
        traces = self.module_traces()
        if aggregation == "trace":
            return traces
        return {name: t / (self.shapes[name][0] * self.shapes[name][1]) for name, t in traces.items()}

    def check_finite(self) -> None:
        """Raise a ``FimloraError`` naming the first module whose statistic or gradient is NaN/inf."""
        bad = [name for name, tensors in self._tensors_by_module().items() if not _all_finite(tensors)]
        bad += [name for name, t in (self.traces or {}).items() if not math.isfinite(t)]
        if bad:
            raise FimloraError(
                f"The Fisher is not finite in {len(bad)} module(s) (first: {bad[0]}); the model produces "
                "NaN/inf gradients on the calibration data."
            )

    def _tensors_by_module(self) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {name: [] for name in self.shapes}
        for name, d in (self.diagonal or {}).items():
            out[name].append(d)
        for name, (a, s) in (self.kfac or {}).items():
            out[name] += [a, s]
        for name, g in (self.gradients or {}).items():
            out[name].append(g)
        return out

    def save(self, directory: str | Path) -> Path:
        """Write ``fisher.safetensors`` and ``fisher.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        tensors: dict[str, torch.Tensor] = {}
        for name, d in (self.diagonal or {}).items():
            tensors[name] = d
        for name, (a, s) in (self.kfac or {}).items():
            tensors[_KFAC_A + name], tensors[_KFAC_S + name] = a, s
        for name, g in (self.gradients or {}).items():
            tensors[_GRADIENT + name] = g
        tensors = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in tensors.items()}
        digest: list[str] = []

        def write_tensors(tmp: Path) -> None:
            save_file(tensors, str(tmp))
            digest.append(sha256_file(tmp))  # of the bytes that get renamed into place

        atomic_write(directory / TENSORS_FILE, write_tensors)
        meta = {
            "num_examples": self.num_examples,
            "estimator": self.estimator,
            "statistic": self.statistic,
            "with_gradient": self.gradients is not None,
            "metadata": self.metadata,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            **({"traces": self.traces} if self.traces is not None else {}),
            "scores": {agg: self.scores(agg) for agg in AGGREGATIONS},
            "checksums": {TENSORS_FILE: {"sha256": digest[0]}},
        }
        atomic_write_json(directory / META_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> FisherResult:
        """Read what :meth:`save` wrote (also files from before ``statistic`` existed: a diagonal)."""
        directory = Path(directory)
        tensors_path, meta_path = directory / TENSORS_FILE, directory / META_FILE
        if not tensors_path.is_file() or not meta_path.is_file():
            raise FimloraError(f"No Fisher found in {directory} (expected {TENSORS_FILE} and {META_FILE}).")
        meta = _read_meta(meta_path)
        _verify_checksum(tensors_path, meta)
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError) as exc:
            raise FimloraError(
                f"{tensors_path} is not a readable safetensors file ({_first_line(exc)}); delete it and "
                "compute the Fisher again."
            ) from None
        try:
            statistic = str(meta.get("statistic", "diagonal"))
            shapes = {str(n): (int(s[0]), int(s[1])) for n, s in meta.get("shapes", {}).items()}
            a = {k.removeprefix(_KFAC_A): t for k, t in tensors.items() if k.startswith(_KFAC_A)}
            s = {k.removeprefix(_KFAC_S): t for k, t in tensors.items() if k.startswith(_KFAC_S)}
            gradients = {k.removeprefix(_GRADIENT): t for k, t in tensors.items() if k.startswith(_GRADIENT)}
            diagonal = {k: t for k, t in tensors.items() if "/" not in k}
            traces = {str(n): float(t) for n, t in meta["traces"].items()} if "traces" in meta else None
            return cls(
                diagonal=diagonal if statistic == "diagonal" else None,
                num_examples=int(meta["num_examples"]),
                estimator=str(meta["estimator"]),
                metadata=dict(meta.get("metadata", {})),
                statistic=statistic,
                traces=traces if statistic == "trace" else None,
                kfac={n: (a[n], s[n]) for n in a} if statistic == "kfac" and set(a) == set(s) else None,
                gradients=gradients if meta.get("with_gradient", False) else None,
                shapes=shapes,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FimloraError(
                f"The Fisher in {directory} is unreadable or its two files describe different modules: "
                f"{_first_line(exc)}."
            ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FimloraError(
            f"{path} is not readable JSON ({_first_line(exc)}); delete it and compute the Fisher again."
        ) from None
    if not isinstance(meta, dict):
        raise FimloraError(
            f"{path} is not a Fisher description (a JSON object); delete it and compute the Fisher again."
        )
    return meta


def _verify_checksum(tensors_path: Path, meta: dict[str, Any]) -> None:
    """Refuse a tensor file whose SHA-256 differs from the one ``fisher.json`` recorded at writing."""
    recorded = meta.get("checksums", {})
    entry = recorded.get(TENSORS_FILE) if isinstance(recorded, dict) else None
    if entry is None:
        return  # written before checksums existed
    expected = entry.get("sha256") if isinstance(entry, dict) else None
    try:
        actual = sha256_file(tensors_path)
    except OSError as exc:
        raise FimloraError(f"Cannot read {tensors_path}: {exc.strerror}.") from None
    if actual != expected:
        raise FimloraError(
            f"{tensors_path} does not match the SHA-256 recorded in {META_FILE} when it was written: the "
            "file is corrupted or was changed; delete it and compute the Fisher again."
        )


def _derive_shapes(result: FisherResult) -> dict[str, tuple[int, int]]:
    if result.diagonal is not None:
        return {name: (int(d.shape[0]), int(d.shape[1])) for name, d in result.diagonal.items()}
    if result.kfac is not None:
        return {name: (int(s.shape[0]), int(a.shape[0])) for name, (a, s) in result.kfac.items()}
    if result.gradients is not None:
        return {name: (int(g.shape[0]), int(g.shape[1])) for name, g in result.gradients.items()}
    if result.traces:
        raise ValueError("a trace-only FisherResult needs its shapes")
    return {}


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    # A float64 sum of float32 values cannot overflow, and is inf/NaN exactly when an entry is: one
    # read pass, where isfinite would allocate masks and an abs copy the size of the tensor.
    return all(math.isfinite(float(t.sum(dtype=torch.float64))) for t in tensors)


def summarize_scores(scores: dict[str, float]) -> dict[str, float]:
    """Spread of the scores: how uneven the importance is (max/min ratio is what proportional rank sees)."""
    values = sorted(scores.values())
    positive = [v for v in values if v > 0]
    return {
        "min": values[0],
        "max": values[-1],
        "max_over_min": values[-1] / positive[0] if positive else math.nan,
    }
