"""EVA: A is the top right-singular vectors of each layer's centred calibration inputs, and the explained-
variance redistribution spends at most the parameter budget."""

from __future__ import annotations

import pytest
import torch
from fisher.fisher_testing import padded_batches
from method_runs import calibration_examples, lora_factors, prepared_experiment, tiny_config
from tiny_models import make_tiny_bert

from fimlora.allocation import uniform_rank_budget
from fimlora.config import parse_config
from fimlora.experiment import build_method, prepare
from fimlora.models import default_target_modules

# MiniLM's 36 targets: per layer 4 attention maps 384→384, 384→1536 and 1536→384 (shapes are (d_out, d_in)).
MINILM_SHAPES = {
    f"l{layer}.{kind}": shape
    for layer in range(6)
    for kind, shape in {
        "q": (384, 384), "k": (384, 384), "v": (384, 384), "o": (384, 384),
        "up": (1536, 384), "down": (384, 1536),
    }.items()
}  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("eva")
    return prepared_experiment(tiny_config(tiny_bert_dir, sentiment_csv, out, ["eva", "lora"]))


def _layer_inputs(prepared, targets):
    """Every calibration token's input to each target layer, one example at a time (no padding)."""
    model = prepared.loaded.model.eval()
    modules = dict(model.named_modules())
    rows = {n: [] for n in targets}
    handles = [
        modules[n].register_forward_hook(
            lambda m, args, out, n=n: rows[n].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for n in targets
    ]
    try:
        with torch.no_grad():
            for batch in calibration_examples(prepared):
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    return {n: torch.cat(r).double() for n, r in rows.items()}


def _same_up_to_sign(x, y, tol):
    return min(float((x - y).norm()), float((x + y).norm())) <= tol


def _mismatches(a_rows, inputs):
    """(checked, wrong): A's rows against the centred inputs' right-singular vectors, wherever the k-th
    singular vector is well defined (its singular value 2% apart from its neighbours)."""
    checked = wrong = 0
    for name, a in a_rows.items():
        x = inputs[name]
        _, sigma, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        for k in range(a.shape[0]):
            gap_before = k == 0 or sigma[k - 1] - sigma[k] > 0.02 * sigma[k - 1]
            gap_after = sigma[k] - sigma[k + 1] > 0.02 * sigma[k]
            if gap_before and gap_after:
                checked += 1
                wrong += not _same_up_to_sign(a[k], vh[k], 1e-3)
    return checked, wrong


@pytest.fixture(scope="module")
def eva_a(prepared):
    built = build_method(prepared, "eva")
    factors = lora_factors(built.model)
    assert all(torch.equal(f["B"], torch.zeros_like(f["B"])) for f in factors.values())
    return {name: f["A"] for name, f in factors.items()}


@pytest.fixture(scope="module")
def inputs(prepared):
    return _layer_inputs(prepared, prepared.targets)


def test_a_is_the_top_right_singular_vectors_of_the_centred_layer_inputs(eva_a, inputs):
    checked, wrong = _mismatches(eva_a, inputs)
    assert wrong == 0
    assert checked >= 0.8 * sum(a.shape[0] for a in eva_a.values())


def test_look_alikes_fail_that_check(eva_a, inputs):
    """A random orthonormal A, and the right-singular vectors of the uncentred inputs, are caught."""
    gen = torch.Generator().manual_seed(0)
    random = {}
    uncentred = {}
    for name, a in eva_a.items():
        q, _ = torch.linalg.qr(torch.randn(a.shape[1], a.shape[0], generator=gen, dtype=torch.float64))
        random[name] = q.T
        uncentred[name] = torch.linalg.svd(inputs[name], full_matrices=False)[2][: a.shape[0]]
    for look_alike in (random, uncentred):
        checked, wrong = _mismatches(look_alike, inputs)
        assert wrong > checked / 4


def test_eva_trains_at_most_the_budget_and_records_what_it_did(prepared):
    built = build_method(prepared, "eva")
    allocation = built.allocation
    assert built.rule.static_ranks and allocation.strategy == "eva"
    assert built.counts["adapter_params"] == allocation.num_params <= prepared.budget
    most = max(d_in + d_out for d_out, d_in in prepared.shapes.values())
    assert prepared.budget - allocation.num_params < most  # spent to within one module-rank
    record = built.ctx.record["eva"]
    assert record["budget_unit"] == "params" and record["initialized"]
    assert record["redistributed_ranks"] == allocation.ranks
    assert set(record["initial_ranks"]) == set(prepared.targets)


def test_each_module_keeps_the_scaling_of_its_starting_rank(prepared):
    """PEFT's adjust_scaling_factors (EVA's default): alpha_i = alpha · r_i / r_start."""
    built = build_method(prepared, "eva")
    start = built.ctx.record["eva"]["initial_ranks"]
    alpha = prepared.config.lora_alpha
    for name, f in lora_factors(built.model).items():
        assert f["s"] == pytest.approx(alpha / start[name]), name


def _peft_rank_budget_rule(ratios, caps, n_ranks):
    """PEFT's EVA redistribution: the n_ranks largest ratios over all modules, each module within its cap."""
    pool = sorted(
        ((float(v), n, k) for n, r in ratios.items() for k, v in enumerate(r[: caps[n]])), reverse=True
    )
    ranks = dict.fromkeys(ratios, 0)
    for _, name, _ in pool[:n_ranks]:
        ranks[name] += 1
    return ranks


def _wide_heavy_ratios(shapes):
    """Explained-variance ratios under which the wide modules' components outrank all but the square
    modules' first one: PEFT's rank budget then puts 2r ranks on every wide module and overspends."""
    out = {}
    for name, (d_out, d_in) in shapes.items():
        k = torch.arange(min(d_out, d_in), dtype=torch.float64)
        if d_out == d_in:
            out[name] = torch.cat([torch.tensor([0.2], dtype=torch.float64), 0.01 * 0.9 ** k[1:]])
        else:
            out[name] = 0.1 * 0.95**k
    return out


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_parameter_budget_holds_on_minilm_shapes_where_peft_rank_budget_overspends(rank):
    from fimlora.methods.allocations.eva import eva_ranks

    budget = uniform_rank_budget(MINILM_SHAPES, rank)
    ratios = _wide_heavy_ratios(MINILM_SHAPES)
    costs = {n: d_out + d_in for n, (d_out, d_in) in MINILM_SHAPES.items()}
    caps = dict.fromkeys(MINILM_SHAPES, 2 * rank)  # rho = 2
    peft = _peft_rank_budget_rule(ratios, caps, rank * len(MINILM_SHAPES))
    assert sum(peft[n] * costs[n] for n in peft) > budget  # the rank budget overspends here
    ranks = eva_ranks(ratios, costs, caps, budget=budget, r_min=1)
    spent = sum(ranks[n] * costs[n] for n in ranks)
    assert spent <= budget
    # Nothing that still fits is left: the budget is spent to within one module-rank.
    assert all(ranks[n] == caps[n] or costs[n] > budget - spent for n in ranks)
    assert all(1 <= ranks[n] <= caps[n] for n in ranks)


def test_with_equal_costs_the_parameter_rule_is_peft_rank_rule():
    """On modules of one width a parameter budget is a rank budget: the redistribution is EVA's own."""
    from fimlora.methods.allocations.eva import eva_ranks

    shapes = {f"m{i}": (64, 64) for i in range(8)}
    gen = torch.Generator().manual_seed(3)
    ratios = {}
    for i, name in enumerate(shapes):  # module i's components decay at its own rate
        values = torch.rand(64, generator=gen, dtype=torch.float64).sort(descending=True).values
        ratios[name] = values * 0.7 ** (i * torch.arange(64, dtype=torch.float64) / 8)
    costs = dict.fromkeys(shapes, 128)
    caps = dict.fromkeys(shapes, 8)
    budget = 4 * 128 * len(shapes)
    ours = eva_ranks(ratios, costs, caps, budget=budget, r_min=1)
    peft = _peft_rank_budget_rule(ratios, caps, 4 * len(shapes))
    # PEFT may drop a module to rank 0; with every module's first component ranked above the others'
    # later ones (true here), both agree.
    assert min(peft.values()) >= 1
    assert ours == peft


@pytest.mark.integration
@pytest.mark.slow
def test_eva_on_minilm_trains_at_most_the_budget_at_ranks_2_4_and_8(tmp_path):
    config = parse_config(
        {
            "model": "minilm",
            "dataset": "movie-reviews",
            "methods": ["eva"],
            "output_dir": str(tmp_path),
            "fisher": {"num_examples": 128, "batch_size": 16},
            "train": {"max_length": 48},
        }
    )
    prepared = prepare(config)
    for rank in (2, 4, 8):
        prepared.budget = uniform_rank_budget(prepared.shapes, rank)
        data = config.model_dump(mode="json", by_alias=True)
        data["budget"] = {"uniform_rank": rank}
        prepared.config = parse_config(data)
        built = build_method(prepared, "eva")
        assert built.counts["adapter_params"] <= prepared.budget, rank


def _moments_worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    import torch.distributed as dist

    from fimlora.methods.allocations.eva import input_components

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        model = make_tiny_bert(num_labels=3)
        shard = _padded()[rank::world_size]
        targets = default_target_modules(model)
        torch.save(input_components(model, shard, targets, use_label_mask=False), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _padded():
    return padded_batches([5, 9, 3, 12, 7, 4, 8, 6, 10, 2], num_labels=3, batch_size=2)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_on_their_shards_find_the_components_of_the_union(tmp_path):
    import sys

    import torch.multiprocessing as mp

    from fimlora.methods.allocations.eva import input_components

    mp.start_processes(
        _moments_worker,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork" if sys.platform == "linux" else "spawn",
    )
    model = make_tiny_bert(num_labels=3)
    single = input_components(model, _padded(), default_target_modules(model), use_label_mask=False)
    for rank in range(2):
        shared = torch.load(tmp_path / f"rank{rank}.pt")
        for name, (components, ratios) in single.items():
            # Equal up to the float32 round-off of each batch's Gram matrix.
            torch.testing.assert_close(shared[name][1], ratios, rtol=1e-5, atol=1e-7)
            for k in range(4):  # components up to sign, where the explained variances are apart
                if ratios[k] - ratios[k + 1] > 0.02 * ratios[k] and (
                    k == 0 or ratios[k - 1] - ratios[k] > 0.02 * ratios[k - 1]
                ):
                    assert _same_up_to_sign(shared[name][0][k], components[k], 1e-4), (name, k)
