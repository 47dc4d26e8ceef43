"""Typed configuration of the evaluation stage (ABMIL CV, linear probes, splits); defaults = the papers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from slicefm.core.config import Strict


class SplitConfig(Strict):
    """CLEAR: >= 1,000 cases -> fixed 20 % held-out test + 5-fold CV; fewer -> nested 5-fold CV."""

    n_folds: int = Field(5, ge=2)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    holdout_min_cases: int = Field(1000, ge=1)
    mode: Literal["auto", "holdout", "nested"] = "auto"


class AbmilConfig(Strict):
    """CLEAR ABMIL head and its training (paper + authors' code)."""

    hidden: int = Field(256, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    loss: Literal["bce", "ce"] = "bce"  # ce: staging (2 mutually exclusive classes)
    pos_weight: bool = True  # per-class n_neg / n_pos in BCE, as the CLEAR code
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(32, ge=1)
    patience: int = Field(8, ge=1)  # early stopping: epochs without validation improvement
    monitor: Literal["val_loss", "val_auroc"] = "val_loss"
    max_instances: int | None = Field(512, ge=1)  # training-time bag sub-sampling (key slices kept)
    # Each training batch is run in chunks of at most this many padded instances, gradients accumulated
    # (same update as the whole batch; CPU caches like it). None = whole batch in one pass (GPU).
    chunk_instances: int | None = Field(4096, ge=1)
    eval_batch_size: int = Field(16, ge=1)


class ProbeConfig(Strict):
    """DALE-CT linear probes: 5 poolings x 4 learning rates, SGD + cosine, selection by val macro AUPRC."""

    poolings: list[Literal["mean", "max", "learned_query", "avg_query", "multi_query"]] = Field(
        default_factory=lambda: ["mean", "max", "learned_query", "avg_query", "multi_query"]
    )
    lrs: list[float] = Field(default_factory=lambda: [0.3, 0.1, 0.01, 0.001])
    momentum: float = Field(0.95, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    steps: int = Field(15_000, ge=1)
    eval_every: int = Field(2_500, ge=1)  # the DALE-CT code checks validation AUPRC every 2,500 steps
    n_queries: int = Field(4, ge=1)  # for "multi_query"
    loss: Literal["bce", "ce"] = "bce"
    eval_batch_size: int = Field(64, ge=1)

    @field_validator("lrs")
    @classmethod
    def _positive(cls, lrs: list[float]) -> list[float]:
        if not lrs or any(lr <= 0 for lr in lrs):
            raise ValueError("lrs must be a non-empty list of positive learning rates")
        return lrs


class TaskConfig(Strict):
    """One prediction task: which label columns, which windows form the bag, which heads to fit."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # scans.parquet columns without the "label_" prefix; a trailing "*" matches a prefix ("location_*").
    labels: list[str] = Field(min_length=1)
    # Windows concatenated into one bag along the slice axis (CLEAR Task 1: abdomen + lung); None = all.
    windows: list[str] | None = None
    protocols: list[Literal["abmil", "probe"]] = Field(default_factory=lambda: ["abmil"], min_length=1)
    # bce: multi-label; ce: mutually exclusive classes (one binary column becomes two classes, CLEAR Task 3).
    loss: Literal["bce", "ce"] = "bce"


def _default_tasks() -> list[TaskConfig]:
    return [TaskConfig(name="lesion_location", labels=["location_*"], windows=None, protocols=["abmil"])]


class EvaluateConfig(Strict):
    """The evaluate stage: tasks, splits, the ABMIL head, the linear probes, latent continuity, plots."""

    seed: int = 0
    tasks: list[TaskConfig] = Field(default_factory=_default_tasks, min_length=1)
    splits: SplitConfig = Field(default_factory=SplitConfig)
    abmil: AbmilConfig = Field(default_factory=AbmilConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    continuity_metric: Literal["cosine", "l2"] = "cosine"  # published DALE-CT number used cosine
    attention_plots: int = Field(6, ge=0)  # attention-over-z PNGs per task (test bags of the first fold)
    headline_metric: Literal["auroc", "auprc", "f1", "balanced_accuracy"] = "auroc"

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique: {names}")
        return tasks


class ExternalConfig(Strict):
    """External cohort B: "frozen" (cohort A's heads unchanged) vs "retrained" (new heads on B's train splits).

    `tasks` name evaluate tasks; B's label columns are the same names unless `class_map` maps a B class to
    one or several A classes (several = max of their scores, DALE-CT's RAD-ChestCT calcification)."""

    enabled: bool = False
    tasks: list[str] = Field(default_factory=lambda: ["lesion_location"])
    protocol: Literal["abmil", "probe"] = "abmil"
    class_map: dict[str, str | list[str]] = Field(default_factory=dict)
