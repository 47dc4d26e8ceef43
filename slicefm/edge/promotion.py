"""The registry gate: which evaluation head a run registers, and whether `champion` moves to it.

Every tracked evaluation registers its candidate head (the best row of the headline task among the
embedding sets that are neither the random-weights baseline nor the supervised ceiling) as a new version of
`<name>-<task>-head`, with its encoder's registry version in its lineage. The alias `champion` moves to it,
and the encoder's `champion` to that encoder version, only when the candidate
1. beats the random-weights baseline's head of the same protocol on the headline metric (macro mean over
   folds), and
2. beats the current champion's recorded value of that metric (when there is a champion).
Otherwise the aliases stay where they are and the run's `slicefm.promotion` tag says why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CHAMPION = "champion"
RANDOM_LABEL = "random"
PROMOTION_TAG = "slicefm.promotion"
WEIGHTS_TAG = "slicefm.weights_sha256"


@dataclass(frozen=True)
class Scored:
    """One head of the headline task: its embedding set, protocol, macro headline metric and files."""

    model: str
    protocol: str
    value: float
    uri: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def pick_candidate(rows: Iterable[Scored], excluded: Sequence[str]) -> Scored | None:
    """The best-scoring row whose embedding set is not one of `excluded` (baseline, ceiling)."""
    eligible = [r for r in rows if r.model not in excluded]
    return max(eligible, key=lambda r: r.value) if eligible else None


def decide(
    candidate: Scored, baseline: Scored | None, champion_value: float | None, metric: str
) -> Decision:
    """The gate: beat the random-weights head of the same protocol, then the current champion."""
    mine = f"{candidate.model} · {candidate.protocol} {metric} {candidate.value:.4f}"
    if baseline is None:
        return Decision(False, f"{mine}: no random-weights baseline of protocol {candidate.protocol} to beat")
    if not candidate.value > baseline.value:
        return Decision(False, f"{mine} does not beat random weights ({baseline.value:.4f})")
    if champion_value is not None and not candidate.value > champion_value:
        return Decision(False, f"{mine} does not beat the current champion ({champion_value:.4f})")
    against = "no champion yet" if champion_value is None else f"champion {champion_value:.4f}"
    return Decision(True, f"{mine} beats random weights ({baseline.value:.4f}) and {against}")


def baseline_for(rows: Iterable[Scored], candidate: Scored) -> Scored | None:
    """The random-weights row with the candidate's protocol."""
    return next((r for r in rows if r.model == RANDOM_LABEL and r.protocol == candidate.protocol), None)


def champion_value(client: Any, name: str, metric_tag: str) -> float | None:
    """The headline value recorded on `name@champion` (None: no such model, alias or tag)."""
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # noqa: BLE001 (MLflow raises its own error types for a missing model or alias)
        return None
    value = (mv.tags or {}).get(metric_tag)
    return float(value) if value is not None else None


def encoder_version(client: Any, name: str, weights_sha256: str | None) -> str | None:
    """The version of registered encoder `name` whose weights hash is `weights_sha256` (newest first)."""
    if not weights_sha256:
        return None
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{WEIGHTS_TAG}` = '{weights_sha256}'")
    except Exception:  # noqa: BLE001 (no such registered model)
        return None
    versions = sorted((int(v.version) for v in found), reverse=True)
    return str(versions[0]) if versions else None
