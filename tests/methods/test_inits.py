"""Each weight-rewriting or magnitude init against its own defining property, and against a look-alike.

"Same function as the base, B ≠ 0" holds for any function-preserving init. The properties here do not:
PiSSA's s·BA is the best rank-r approximation of W with balanced factors (BᵀB = AAᵀ = diag(σ_{1..r})/s);
OLoRA's B is the orthonormal Q of W's QR (A = BᵀW, upper-triangular); both leave W_res = W − s·BA.
DoRA's magnitude is the norm of each output feature's weight vector. Each check is run on the method it
defines (no violation) and on a look-alike (every module violates it).
"""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from fimlora.config import parse_config
from fimlora.experiment import build_method, prepare

BUDGET_RANK = 4


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    config = parse_config(
        {
            "model": str(tiny_bert_dir),
            "dataset": str(sentiment_csv),
            "dataset_options": {"text_column": "review", "label_column": "sentiment"},
            "output_dir": str(tmp_path_factory.mktemp("inits")),
            "methods": ["pissa", "olora", "dora", "lora"],
            "budget": {"uniform_rank": BUDGET_RANK},
            "lora": {"alpha": 6},  # s = α/r = 1.5: a forgotten scaling shows
            "train": {"max_length": 24, "report_to": []},
        }
    )
    return prepare(config)


def _layers(prepared, method):
    """name -> (W_0 pristine, W after the init, A, B, s) as float64, for every LoRA layer of ``method``."""
    built = build_method(prepared, method)
    pristine = dict(prepared.loaded.model.named_modules())
    out = {}
    for name, module in built.model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = (
                pristine[name].weight.detach().double(),
                module.get_base_layer().weight.detach().double(),
                module.lora_A["default"].weight.detach().double(),
                module.lora_B["default"].weight.detach().double(),
                float(module.scaling["default"]),
            )
    assert set(out) == set(prepared.targets)
    return out


def _close(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> bool:
    return bool((x - y).abs().max() <= 1e-5 * max(1.0, float(scale.abs().max())))


def pissa_violations(w0, w, a, b, s) -> list[str]:
    """What of PiSSA's definition (Meng et al. 2024, Eq. 2–4) the init breaks."""
    r = a.shape[0]
    u, sigma, vh = torch.linalg.svd(w0, full_matrices=False)
    found = []
    if not _close(s * b @ a, (u[:, :r] * sigma[:r]) @ vh[:r], w0):
        found.append("s·BA is not W's top-r truncated SVD")
    balanced = torch.diag(sigma[:r] / s)
    if not (_close(b.T @ b, balanced, w0) and _close(a @ a.T, balanced, w0)):
        found.append("factors not U√(σ/s), √(σ/s)Vᵀ: BᵀB = AAᵀ = diag(σ/s) fails")
    if not _close(w, w0 - s * b @ a, w0):
        found.append("W_res ≠ W − s·BA")
    return found


def olora_violations(w0, w, a, b, s) -> list[str]:
    """What of OLoRA's definition (Büyükakyüz 2024: W = QR, B = Q_r, A = R_r) the init breaks."""
    r = a.shape[0]
    found = []
    if not _close(b.T @ b, torch.eye(r, dtype=b.dtype), torch.ones(1)):
        found.append("B's columns are not orthonormal")
    if not _close(a, b.T @ w0, w0):
        found.append("A ≠ BᵀW (R's first rows)")
    if not _close(torch.tril(a, diagonal=-1), torch.zeros_like(a), w0):
        found.append("A is not upper-triangular: B does not span W's first r columns")
    if not _close(w, w0 - s * b @ a, w0):
        found.append("W_res ≠ W − s·BA")
    return found


@pytest.mark.parametrize(
    ("method", "check", "look_alike"),
    [("pissa", pissa_violations, "olora"), ("olora", olora_violations, "pissa")],
)
def test_weight_rewriting_init_has_its_defining_property_and_its_look_alike_does_not(
    prepared, method, check, look_alike
):
    for name, layer in _layers(prepared, method).items():
        assert check(*layer) == [], (method, name)
    for name, layer in _layers(prepared, look_alike).items():
        assert check(*layer), f"{look_alike}'s init passes {method}'s test at {name}"
    for name, layer in _layers(prepared, "lora").items():  # B = 0 and W untouched: not it either
        assert check(*layer), f"LoRA's init passes {method}'s test at {name}"


def dora_violations(w0: torch.Tensor, magnitude: torch.Tensor) -> list[str]:
    """DoRA (Liu et al. 2024): m = ‖W‖_c at init, one entry per output feature. PyTorch stores W as
    (d_out, d_in), so the paper's column norm is the norm over d_in of each row."""
    expected = torch.linalg.vector_norm(w0, dim=1)
    if magnitude.shape != expected.shape:
        return [f"magnitude has shape {tuple(magnitude.shape)}, not one entry per output feature"]
    if not torch.allclose(magnitude, expected, rtol=1e-5, atol=1e-6):
        return ["magnitude ≠ the norms of W's output-feature vectors"]
    return []


def test_dora_magnitude_is_the_weights_column_norm_at_init(prepared):
    built = build_method(prepared, "dora")
    pristine = dict(prepared.loaded.model.named_modules())
    square = 0
    for name, module in built.model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        w0 = pristine[name].weight.detach().double()
        magnitude = module.lora_magnitude_vector["default"].weight.detach().double()
        assert dora_violations(w0, magnitude) == [], name
        # Look-alikes fail: norms along the other axis (a wrong shape, or on square layers wrong values)
        # and ones.
        assert dora_violations(w0, torch.linalg.vector_norm(w0, dim=0)), name
        assert dora_violations(w0, torch.ones_like(magnitude)), name
        square += w0.shape[0] == w0.shape[1]
    assert square > 0  # the wrong-axis look-alike was tested where the shapes agree too
