"""Experiment configuration: one YAML file, validated with pydantic (unknown keys are errors).

Units: ``budget.params`` counts trainable LoRA parameters, Σ r_i·(d_in + d_out); ``budget.uniform_rank``
is shorthand for what uniform LoRA of that rank costs on the same target modules.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fimlora.errors import FimloraError

if TYPE_CHECKING:
    from fimlora.data.identity import DataIdentity

PROBE_NEEDS_CLASSIFICATION = (
    "fisher.head: probe fits a classification head on frozen features; a causal LM's output head is "
    "pretrained, so use fisher.head: random"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSettings(_Strict):
    text_column: str | None = Field(
        None,
        description="Text column of a local file or hub dataset; default: the first of text, sentence, "
        "content that exists. Not for built-in datasets.",
    )
    label_column: str | None = Field(
        None,
        description="Label column of a local file or hub dataset; default: label or labels if present, else "
        "none (the task then defaults to causal-lm). Not for built-in datasets.",
    )
    hub_config: str | None = Field(None, description="Configuration name of a Hugging Face dataset.")
    drop_eval_duplicates: StrictBool = Field(
        False,
        description="Drop validation rows whose text (normalised) is also in train, and test rows also in "
        "train or validation; they are counted and warned about either way.",
    )


class ProbeSettings(_Strict):
    """How ``fisher.head: probe`` fits the classification head on frozen features (training split only)."""

    num_examples: int = Field(1024, ge=2, description="Training examples the head is fitted on (seeded).")
    max_iter: int = Field(100, ge=1, description="L-BFGS iterations (full batch over the cached features).")
    l2: float = Field(
        1e-3, ge=0, description="L2 penalty (l2/2)·‖W‖² on the head's weight matrices, added to the mean CE."
    )


class FisherSettings(_Strict):
    estimator: Literal["empirical", "mc"] = Field(
        "empirical",
        description="Labels of each example's loss: empirical = the data's; mc = sampled (seeded) from the "
        "model's own predictive distribution, per token for a causal LM.",
    )
    num_examples: int = Field(256, ge=1, description="Calibration examples, drawn from the training split.")
    batch_size: int = Field(
        16,
        ge=1,
        description="Calibration examples per forward/backward pass (also the probe's feature batches): a "
        "memory setting, each example's gradient is exact whatever the batch.",
    )
    aggregation: Literal["mean", "trace"] = Field(
        "mean",
        description="Per-module score of the Fisher-scored allocations: mean = tr F / (d_out·d_in), the mean "
        "diagonal entry; trace = tr F, which favours large modules.",
    )
    head: Literal["random", "probe"] = Field(
        "random",
        description="The classification head every method starts from (and the Fisher is taken through): "
        "random = its seeded initialisation; probe = fitted first on frozen features of the training split.",
    )
    probe: ProbeSettings = Field(
        ProbeSettings(), description="How head: probe fits the head; unused with head: random."
    )


class AllocationSettings(_Strict):
    tau: float = Field(1.0, gt=0, description="Ranks ∝ score^tau for proportional allocation.")
    r_min: int = Field(
        1,
        ge=0,
        description="Smallest rank of any module; 0 lets a module get no adapter at all (rank 0).",
    )
    r_max: int | None = Field(
        None,
        ge=1,
        description="Largest rank of any module (each is capped at min(d_in, d_out) anyway); "
        "default: no further cap.",
    )


class BudgetSettings(_Strict):
    """Exactly one of ``uniform_rank`` (default 8) or ``params``."""

    uniform_rank: int | None = Field(
        None,
        ge=1,
        description="The budget as what uniform LoRA of this rank costs on the target modules, also the "
        "reference rank (lora.alpha's default, AdaLoRA, GoRA); default 8 when params is unset too.",
    )
    params: int | None = Field(
        None,
        ge=1,
        description="The budget in trainable adapter parameters, Σ r_i·(d_in + d_out); the reference rank "
        "is then 8. Not together with uniform_rank.",
    )

    @model_validator(mode="after")
    def _one_of(self) -> BudgetSettings:
        if self.uniform_rank is not None and self.params is not None:
            raise ValueError("give either budget.uniform_rank or budget.params, not both")
        return self

    @property
    def reference_rank(self) -> int:
        return self.uniform_rank if self.uniform_rank is not None else 8


class LoraSettings(_Strict):
    alpha: float | None = Field(None, gt=0, description="Default: 2 × the budget's reference rank.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout probability on the adapter's input (PEFT's lora_dropout; also VeRA's and "
        "HydraLoRA's); 0 = none. Delta-LoRA needs 0.",
    )
    scaling: Literal["alpha_over_r", "constant", "alpha_over_sqrt_r"] = Field(
        "alpha_over_r",
        description="Module scaling: alpha/r_i (PEFT's default), alpha/r of the reference rank "
        "(constant), or rsLoRA's alpha/sqrt(r_i) (alpha_over_sqrt_r).",
    )


class AdaLoraSettings(_Strict):
    init_rank_factor: float = Field(
        1.5, ge=1, description="init_r = ceil(factor × the budget's reference rank)."
    )
    tinit_ratio: float = Field(0.1, ge=0, lt=1, description="Steps before pruning starts, as a fraction.")
    tfinal_ratio: float = Field(
        0.2, ge=0, lt=1, description="Final steps at the target budget, as a fraction."
    )
    delta_t: int = Field(1, ge=1, description="Steps between two re-allocations.")
    beta1: float = Field(
        0.85, gt=0, lt=1, description="EMA coefficient of the sensitivity smoothing (PEFT's)."
    )
    beta2: float = Field(
        0.85, gt=0, lt=1, description="EMA coefficient of the uncertainty quantification (PEFT's)."
    )
    orth_reg_weight: float = Field(
        0.1,
        ge=0,
        description="γ of the orthogonality penalty; 0.1 as in the paper's code (PEFT's default: 0.5).",
    )
    budget_unit: Literal["params", "ranks"] = Field(
        "params", description="params: prune to the parameter budget; ranks: PEFT's rank budget unchanged."
    )


class FisherOnlineSettings(_Strict):
    """fisher-online (fim-lora-dynamic): ranks re-solved during training on the training pass's Fisher."""

    start: Literal["fisher", "uniform"] = Field(
        "fisher", description="Initial ranks: the static Fisher allocation (fim-lora's) or uniform."
    )
    reallocate_at: list[float] = Field(
        default_factory=lambda: [0.1, 0.3],
        min_length=1,
        description="When to re-solve the allocation, as increasing fractions of train.steps in (0, 1).",
    )
    averaging: Literal["ema", "mean"] = Field(
        "ema", description="Running average of the per-step trace: bias-corrected EMA, or mean over steps."
    )
    ema_beta: float = Field(0.9, ge=0, lt=1, description="EMA decay per optimizer step.")

    @field_validator("reallocate_at")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        if any(not 0 < v < 1 for v in values):
            raise ValueError("reallocate_at holds fractions of the training steps, each in (0, 1)")
        if any(b <= a for a, b in itertools.pairwise(values)):
            raise ValueError("reallocate_at must be strictly increasing")
        return values


class EvaSettings(_Strict):
    rho: float = Field(2.0, ge=1, description="A module may get up to rho × r ranks.")
    tau: float = Field(0.99, gt=0, le=1, description="Cosine-similarity threshold for SVD convergence.")


class LoraGaSettings(_Strict):
    variant: Literal["official", "peft"] = Field(
        "official",
        description="official: A, B = singular vectors of Ḡ × d_out^¼/√γ (Outsider565/LoRA-GA); "
        "peft: PEFT 0.21's B = U·diag(S)·d_out^¼/√γ.",
    )
    stable_gamma: float = Field(16.0, gt=0, description="γ of the stable scale d_out^¼/√γ.")


class GoraSettings(_Strict):
    init_lr: float = Field(
        0.05, gt=0, description="γ: the initial adapter is a gradient-descent step of this size (--gora-lr)."
    )
    min_rank_factor: float = Field(0.5, ge=0, description="Smallest rank: floor(factor × reference rank).")
    max_rank_factor: float = Field(4.0, gt=0, description="Largest rank: floor(factor × reference rank).")


class LoraPlusSettings(_Strict):
    lr_ratio: float = Field(16.0, ge=1, description="Learning rate of B over that of A.")


class RiemannianSettings(_Strict):
    reg: float = Field(1e-2, ge=0, description="Damping λ of the r×r preconditioners.")
    base_optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="Optimizer fed the preconditioned gradients."
    )


class VeraSettings(_Strict):
    rank: int = Field(256, ge=1, description="Rank of the shared random projections (capped by layer dims).")
    d_initial: float = Field(
        0.1,
        gt=0,
        description="Initial value of every entry of the trainable scaling vector d (b starts at 0).",
    )


class DeltaLoraSettings(_Strict):
    lambda_: float = Field(2.0, ge=0, alias="lambda", description="W moves by λ·Δ(sBA) after warm-up.")
    warmup_ratio: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="K = int(ratio × train.steps) start steps; W moves at 0-based steps t > K (Algorithm 1).",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class HydraLoraSettings(_Strict):
    num_heads: int | Literal["auto"] = Field(
        "auto", description="Number of B heads k, or 'auto': cluster the training texts (k ≤ k_max)."
    )
    k_max: int = Field(
        8,
        ge=2,
        description="With num_heads: auto, the largest k tried (k = 2..k_max, also capped by what the "
        "budget pays for).",
    )
    balance_weight: float = Field(0.0, ge=0, description="Weight of the router load-balance loss.")


class SpectralSettings(_Strict):
    damping: float = Field(1e-3, ge=0, description="K-FAC damping (× mean eigenvalue) for the whitened gain.")


class HindsightSource(_Strict):
    """A source run picked from a run store: the one finished run below ``store`` of ``method`` and
    ``seed`` that trained the same model on the same data (by content) for the same number of steps and
    whose resolved config has every ``where`` value. Tuning trials are never picked."""

    method: str = Field(description="The source run's method name, e.g. full-ft or lora.")
    seed: int | Literal["same"] = Field(
        "same", description="The source run's seed; 'same' = this run's seed (seed-matched sources)."
    )
    store: str | None = Field(
        None,
        description="Directory searched recursively for runs (relative to the working directory); "
        "default: this experiment's output_dir.",
    )
    where: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted config keys the source's config.yaml must have, e.g. {budget.uniform_rank: 8}.",
    )


class HindsightSettings(_Strict):
    """Where the ``hindsight`` rule (preset ``hindsight-lora``) reads its trained updates from."""

    source: str | HindsightSource | None = Field(
        None,
        description="A finished run directory (<output_dir>/<method>) or a selector {method, seed, "
        "store, where}, for every method whose allocation is hindsight.",
    )
    sources: dict[str, str | HindsightSource] = Field(
        default_factory=dict,
        description="Per method name: its own source (overrides source), e.g. one full-ft, one LoRA.",
    )

    def source_for(self, method: str) -> str | HindsightSource | None:
        """The source named for ``method``: its entry in ``sources``, else ``source``."""
        return self.sources.get(method, self.source)


class FullFtSettings(_Strict):
    lr_scale: float = Field(0.1, gt=0, description="Full fine-tuning lr = train.learning_rate × lr_scale.")


class MethodOptions(_Strict):
    """Knobs of individual methods; each applies only to the methods that use it."""

    adalora: AdaLoraSettings = Field(AdaLoraSettings(), description="AdaLoRA (allocation adalora).")
    fisher_online: FisherOnlineSettings = Field(
        FisherOnlineSettings(), description="fim-lora-dynamic (allocation fisher-online)."
    )
    eva: EvaSettings = Field(EvaSettings(), description="EVA (allocation eva).")
    lora_ga: LoraGaSettings = Field(
        LoraGaSettings(), description="LoRA-GA's initialisation (adapter lora-ga)."
    )
    gora: GoraSettings = Field(GoraSettings(), description="GoRA (allocation and adapter gora).")
    loraplus: LoraPlusSettings = Field(LoraPlusSettings(), description="LoRA+ (optimizer loraplus).")
    riemannian: RiemannianSettings = Field(
        RiemannianSettings(), description="Riemannian preconditioned LoRA (optimizer riemannian)."
    )
    vera: VeraSettings = Field(VeraSettings(), description="VeRA (adapter vera).")
    delta_lora: DeltaLoraSettings = Field(DeltaLoraSettings(), description="Delta-LoRA (adapter delta-lora).")
    hydralora: HydraLoraSettings = Field(HydraLoraSettings(), description="HydraLoRA (adapter hydralora).")
    spectral: SpectralSettings = Field(
        SpectralSettings(), description="The K-FAC-whitened spectral allocation (whitened-spectral)."
    )
    hindsight: HindsightSettings = Field(
        HindsightSettings(), description="The source runs of the hindsight allocation (hindsight-lora)."
    )
    full_ft: FullFtSettings = Field(FullFtSettings(), description="Full fine-tuning (adapter full).")


class MethodEntry(_Strict):
    """A method given by its axes; unspecified axes come from the preset of that name, if any."""

    name: str = Field(
        description="The method's name in runs and results (its run directory); a preset's name starts "
        "from that preset's axes."
    )
    allocation: str | None = Field(
        None,
        description="Rank allocation rule (uniform, fisher, adalora, …; none for adapters without ranks); "
        "default: the preset's, else uniform.",
    )
    adapter: str | None = Field(
        None, description="Adapter (lora, dora, vera, full, …); default: the preset's, else lora."
    )
    optimizer: str | None = Field(
        None,
        description="Optimizer (adamw, loraplus, lora-fa, riemannian); default: the preset's, else adamw.",
    )


class TrainSettings(_Strict):
    steps: int = Field(
        100, ge=1, description="Optimizer steps of training, each on train.batch_size examples."
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="Training examples per optimizer step, over all processes (it must split evenly "
        "among them).",
    )
    learning_rate: float = Field(
        1e-3,
        gt=0,
        description="Peak learning rate, after warm-up; full fine-tuning trains at this × "
        "method_options.full_ft.lr_scale.",
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="AdamW's decoupled weight decay, on all trained weights but biases and normalisation "
        "weights (the Trainer's rule, also applied by LoRA+, LoRA-FA and Riemannian).",
    )
    warmup_ratio: float = Field(
        0.06, ge=0, lt=1, description="Linear warm-up over int(ratio × train.steps) steps."
    )
    lr_scheduler: str = Field(
        "linear",
        description="Learning-rate schedule: a transformers lr_scheduler_type (linear, cosine, "
        "constant_with_warmup, …).",
    )
    max_length: int = Field(64, ge=2, description="Tokens per example (causal LM: block length).")
    sampling: Literal["random", "group_by_length"] = Field(
        "random",
        description="Order of the training examples: random batches, or group_by_length (transformers' "
        "LengthGroupedSampler: shuffled, then sorted by length within megabatches of 50 batches): less "
        "padding and faster steps, but batches of similar length make another training run, not the "
        "same one faster. Causal LM blocks all have train.max_length tokens: no effect there.",
    )
    eval_split: Literal["validation", "test"] = Field(
        "validation", description="Split of the run's final evaluation; final numbers say test explicitly."
    )
    eval_examples: int | None = Field(None, ge=1, description="Cap on evaluated examples; None = all.")
    eval_every: int | None = Field(
        None, ge=1, description="Optimiser steps between validation evaluations during training; None = none."
    )
    eval_batch_size: int = Field(
        64,
        ge=1,
        description="Examples per batch when evaluating (and timing classification inference, and "
        "forgetting): memory and speed, not the scores.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (transformers' own, non-reentrant)."
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Trainer loggers (tensorboard, mlflow, wandb, …); logs go to the run's logs/ directory.",
    )


DEFAULT_PROMPTS: tuple[str, ...] = (
    "The old man looked at the",
    "She opened the door and",
    "It was late in the evening when",
)


class EvaluateSettings(_Strict):
    """What a run measures after training besides the held-out metric (``fimlora.deploy``)."""

    inference: bool = Field(
        True, description="Time inference of the trained model unmerged, merged and of the base model."
    )
    inference_examples: int = Field(
        16, ge=1, description="Timed inputs per model: classification examples, or causal-LM prompts."
    )
    inference_new_tokens: int = Field(32, ge=1, description="Causal LM: tokens generated per prompt, timed.")
    forgetting_dataset: str | None = Field(
        "auto",
        description="Causal LM: general text the fine-tune does not target (a dataset name); 'auto' "
        "picks one per dataset (fimlora.forgetting), null turns the measure off.",
    )
    forgetting_blocks: int = Field(64, ge=1, description="Blocks of train.max_length general-text tokens.")
    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        description="Causal LM: fixed prompts continued greedily at the end of the run (result.json).",
    )
    continuation_tokens: int = Field(24, ge=1, description="New tokens per prompt continuation.")


class ExperimentConfig(_Strict):
    """One experiment: a model, a dataset, a budget and the methods compared at that budget."""

    model: str = Field(description="Built-in name (minilm, smollm2), local directory or hub id.")
    dataset: str | dict[str, str] = Field(
        description="Built-in name, local .csv/.json/.jsonl file, directory of split files, hub dataset id, "
        "or a mapping split → file."
    )
    task: Literal["classification", "causal-lm"] | None = Field(
        None,
        description="Default: the built-in dataset's task (no other is allowed), else classification when "
        "the data has a label column and causal-lm otherwise.",
    )
    dataset_options: DatasetSettings = Field(
        DatasetSettings(),
        description="How the dataset is read: columns and hub configuration (local and hub data), and "
        "whether evaluation rows that repeat an earlier split are dropped.",
    )
    methods: list[str | MethodEntry] = Field(
        default_factory=lambda: list[str | MethodEntry](["lora", "fim-lora", "random-rank"]),
        min_length=1,
        description="Preset names or {name, allocation, adapter, optimizer} mappings.",
    )
    target_modules: list[str] | str | None = Field(
        None,
        description="Linear layers in the transformer blocks that get adapters: names (a layer matches when "
        "its full name is or ends with .name, as in PEFT) or one regex matched against full names; "
        "default: every linear layer in the blocks.",
    )
    seed: int = Field(
        0,
        description="Training randomness: head init, adapter init, data order, dropout, calibration subset.",
    )
    data_seed: int = Field(0, description="The train/validation/test split (and the eval_examples subset).")
    output_dir: str = Field(
        "runs/experiment",
        description="Where the runs go, one directory per method named after it, with the cached Fisher; "
        "relative to the working directory. A sweep sets it per run.",
    )
    trust_remote_code: StrictBool = Field(
        False,
        description="Run code shipped with a hub model or dataset. A security switch: only a real YAML "
        "boolean turns it on, never a string such as 'yes' or 'false'.",
    )
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none", description="Base model's transformer blocks in int8 or NF4 (bitsandbytes; QLoRA)."
    )
    budget: BudgetSettings = Field(
        BudgetSettings(),
        description="Trainable parameters every method is held to: uniform_rank or params (default: "
        "uniform_rank 8).",
    )
    fisher: FisherSettings = Field(
        FisherSettings(),
        description="The calibration pass on the frozen weights, and the classification head every "
        "method starts from.",
    )
    allocation: AllocationSettings = Field(
        AllocationSettings(), description="Rank bounds and the exponent of the methods that allocate ranks."
    )
    lora: LoraSettings = Field(LoraSettings(), description="Alpha, dropout and scaling of the adapters.")
    train: TrainSettings = Field(TrainSettings(), description="Training and evaluation of every run.")
    method_options: MethodOptions = Field(
        MethodOptions(),
        description="Knobs of individual methods; each applies only to the methods that use it.",
    )
    evaluate: EvaluateSettings = Field(
        EvaluateSettings(),
        description="What a run measures after training besides the held-out metric: inference time, "
        "forgetting, prompt continuations.",
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str | MethodEntry]) -> list[str | MethodEntry]:
        from fimlora.methods import method_name, resolve_method

        for entry in methods:
            try:
                resolve_method(entry)
            except FimloraError as exc:
                raise ValueError(str(exc)) from None
        names = [method_name(m) for m in methods]
        if len(set(names)) != len(names):
            raise ValueError("method names must not repeat")
        return methods

    @field_validator("dataset")
    @classmethod
    def _dataset_mapping(cls, dataset: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(dataset, dict):
            from fimlora.data.files import check_split_mapping

            try:
                check_split_mapping(dataset)
            except FimloraError as exc:
                raise ValueError(str(exc)) from None
        return dataset

    @model_validator(mode="after")
    def _supported_scaling(self) -> ExperimentConfig:
        from fimlora.methods import check_scaling, resolve_method

        for entry in self.methods:
            try:
                check_scaling(resolve_method(entry), self.lora.scaling)
            except FimloraError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def dataset_label(self) -> str:
        """The dataset as one string (a split mapping as ``train=…,validation=…``), for records and tables."""
        from fimlora.data.files import dataset_label

        return dataset_label(self.dataset)

    def data_identity(self, *, splits: Collection[str] | None = None) -> DataIdentity:
        """What the dataset is by content (local files hashed; :mod:`fimlora.data.identity`): whether a
        finished run, a cached Fisher or a tuning study still holds. ``splits``: those that may be loaded
        (the others' files are not read)."""
        from fimlora.data.identity import data_identity

        return data_identity(self.dataset, hub_config=self.dataset_options.hub_config, splits=splits)

    @model_validator(mode="after")
    def _probe_needs_a_classifier(self) -> ExperimentConfig:
        if self.task == "causal-lm" and self.fisher.head == "probe":
            raise ValueError(PROBE_NEEDS_CLASSIFICATION)
        return self

    @field_validator("quantization")
    @classmethod
    def _methods_run_on_the_base(cls, quantization: str, info: ValidationInfo) -> str:
        from fimlora.methods import check_quantized_base, resolve_method

        if quantization != "none":
            for entry in info.data.get("methods", ()):  # absent when the methods were invalid already
                try:
                    check_quantized_base(resolve_method(entry), quantization)
                except FimloraError as exc:
                    raise ValueError(str(exc)) from None
        return quantization

    @model_validator(mode="after")
    def _hindsight_methods_name_a_source(self) -> ExperimentConfig:
        from fimlora.methods import get_allocation, method_name, resolve_method

        for entry in self.methods:
            name = method_name(entry)
            rule = get_allocation(resolve_method(entry).allocation)
            if rule.reads_source_run and self.method_options.hindsight.source_for(name) is None:
                raise ValueError(
                    f"method {name!r} allocates from a finished source run: name it in "
                    "method_options.hindsight.source (a run directory or {method: full-ft, seed: same, "
                    f"store: DIR}}), or in method_options.hindsight.sources.{name}"
                )
        return self

    @model_validator(mode="after")
    def _methods_allow_rank_zero(self) -> ExperimentConfig:
        from fimlora.methods import check_rank_zero, resolve_method

        if self.allocation.r_min == 0:
            for entry in self.methods:
                try:
                    check_rank_zero(resolve_method(entry))
                except FimloraError as exc:
                    raise ValueError(str(exc)) from None
        return self

    @property
    def method_names(self) -> list[str]:
        from fimlora.methods import method_name

        return [method_name(m) for m in self.methods]

    @property
    def lora_alpha(self) -> float:
        return self.lora.alpha if self.lora.alpha is not None else 2.0 * self.budget.reference_rank

    def for_method(self, method: str) -> ExperimentConfig:
        """The resolved config of one run: this experiment restricted to the method named ``method``."""
        entry = self.methods[self.method_names.index(method)]
        return self.model_copy(update={"methods": [entry]})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Run keys (``fimlora sweep``) and tuning study names (``fimlora tune``) hash a config's whole JSON, so a
# field added with a default would rename every finished run and every study: a sweep would train the
# finished runs again and a tuning would start its studies over, hours into a study that spans sessions.
# A field added from now on goes here, dotted path → default: left out of keys while it holds that
# default, hashed once set otherwise. tests/sweep/test_committed_study.py fails for a change that renames
# the committed study's runs or studies.
UNKEYED_DEFAULTS: dict[str, Any] = {"train.sampling": "random"}


def _unkeyed_leaves(tree: dict[str, Any], *, create: bool) -> Iterator[tuple[dict[str, Any], str, Any]]:
    """``(parent mapping, leaf key, default)`` of each :data:`UNKEYED_DEFAULTS` field in ``tree``, a
    config's JSON; ``create`` makes missing parent mappings, otherwise a field without them is skipped."""
    for path, default in UNKEYED_DEFAULTS.items():
        *parents, leaf = path.split(".")
        node: Any = tree
        for part in parents:
            node = node.setdefault(part, {}) if create else node.get(part)
            if not isinstance(node, dict):
                break
        else:
            yield node, leaf, default


def with_unkeyed_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded config (its ``config.yaml`` as read) with every field of :data:`UNKEYED_DEFAULTS`
    that it predates filled in at its default: a run made before a field existed ran as its default
    says, and reads so beside the runs made after (the results table would otherwise see the field
    vary and split their groups)."""
    filled = copy.deepcopy(raw)
    for node, leaf, default in _unkeyed_leaves(filled, create=True):
        node.setdefault(leaf, copy.deepcopy(default))
    return filled


def key_view(config: ExperimentConfig) -> dict[str, Any]:
    """What run keys and study names hash of ``config``: its JSON without ``output_dir`` and without the
    fields of :data:`UNKEYED_DEFAULTS` that hold their default."""
    view = config.model_dump(mode="json", exclude={"output_dir"})
    for node, leaf, default in _unkeyed_leaves(view, create=False):
        if leaf in node and node[leaf] == default:
            del node[leaf]
    return view


def format_validation_error(exc: ValidationError, *, root: str = "config") -> str:
    """One line per problem, ``dotted.path: message`` (``root`` names an error of the whole document)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or root
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def read_yaml_file(path: Path, what: str) -> Any:
    """The parsed content of a YAML file; unreadable, invalid or empty files are a one-line FimloraError
    naming ``what`` the file was meant to be."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FimloraError(f"Cannot read {what} {path}: {exc.strerror}.") from None
    except UnicodeDecodeError as exc:
        raise FimloraError(
            f"{what.capitalize()} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8."
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise FimloraError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    if data is None:
        raise FimloraError(f"{path} is empty.")
    return data


def parse_config(data: Any, *, source: str = "config") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise FimloraError(f"{source} must be a YAML mapping of settings, got {type(data).__name__}.")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise FimloraError(f"Invalid {source}: {format_validation_error(exc)}.") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate a YAML experiment config; ``overrides`` replace top-level keys."""
    path = Path(path)
    data = read_yaml_file(path, "config")
    if overrides and isinstance(data, dict):
        data = {**data, **overrides}
    return parse_config(data, source=str(path))
