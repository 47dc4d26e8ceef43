"""Every evaluated task at a glance: the macro headline metric per (task, protocol) and embedding set, each
set's paired difference from the random set with its verdict, and the share of the random→supervised gap
closed. Rendered for terminals (aligned markdown), the report (markdown, HTML) and results.json."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from slicefm.evaluate.metrics import Summary
from slicefm.evaluate.paired import (
    HOLDS,
    REFERENCE,
    SUPERVISED,
    PairedDiff,
    compare_sets,
    fold_macros,
    gap_closed,
)
from slicefm.evaluate.protocols import CVResult
from slicefm.evaluate.report import RowKey, Table, format_cell, html_page, to_html


@dataclass
class Comparison:
    """The all-tasks summary of one evaluate run, for one metric (the headline metric)."""

    metric: str
    reference: str
    macro: dict[str, dict[str, dict[str, Summary]]]  # task -> protocol -> set -> macro `metric` over folds
    paired: dict[str, dict[str, dict[str, PairedDiff]]]  # task -> protocol -> set -> (set − reference)

    @property
    def sets(self) -> list[str]:
        names = [s for protocols in self.macro.values() for per in protocols.values() for s in per]
        return list(dict.fromkeys(names))

    @property
    def compared(self) -> list[str]:
        return [s for s in self.sets if s != self.reference] if self.reference in self.sets else []

    def gap_closed(self, task: str, protocol: str, name: str) -> float | None:
        """Share of the reference→supervised gap that set `name` closes on (task, protocol); None unless the
        ceiling itself beats the reference (its paired difference holds): a gap of noise gives no share."""
        per = self.macro[task][protocol]
        if SUPERVISED not in per or self.reference not in per or name not in per:
            return None
        ceiling = self.paired.get(task, {}).get(protocol, {}).get(SUPERVISED)
        if ceiling is None or ceiling.verdict != HOLDS:
            return None
        return gap_closed(per[name].mean, per[self.reference].mean, per[SUPERVISED].mean)

    def table(self) -> Table:
        """Rows task × protocol; columns: folds, each set's mean ± sd, each compared set's paired difference
        with its interval and verdict, and (with a supervised set) the gap closed."""
        gap_sets = self._gap_sets()
        table: Table = [
            ["task", "protocol", "folds", *self.sets,
             *(f"{s} − {self.reference} [95% CI]" for s in self.compared),
             *(f"{s}: gap closed" for s in gap_sets)]
        ]  # fmt: skip
        for task, protocols in self.macro.items():
            for protocol, per in protocols.items():
                diffs = self.paired.get(task, {}).get(protocol, {})
                gaps = [self.gap_closed(task, protocol, s) for s in gap_sets]
                table.append(
                    [task, protocol, _folds_cell(per, diffs),
                     *(format_cell(per[s]) if s in per else "—" for s in self.sets),
                     *(_diff_cell(diffs[s]) if s in diffs else "—" for s in self.compared),
                     *(f"{g:.2f}" if g is not None else "n/a" for g in gaps)]
                )  # fmt: skip
        return table

    def _gap_sets(self) -> list[str]:
        return [s for s in self.compared if s != SUPERVISED] if SUPERVISED in self.compared else []

    def caption(self) -> str:
        """What the table holds, one sentence a line."""
        lines = [f"Macro {self.metric.upper()} of every task, mean ± sd over folds (test sets)."]
        if not self.compared:
            return "\n".join([*lines, f"No {self.reference!r} embedding set: no paired differences."])
        lines.append(
            f"Set − {self.reference}: per-fold paired difference on identical folds, mean [95% Student "
            "t-interval over the folds with a value in both]; holds = the whole interval is above 0."
        )
        if self._gap_sets():
            lines.append(
                f"Gap closed = (set − {self.reference}) / ({SUPERVISED} − {self.reference}) of the means, "
                f"n/a unless {SUPERVISED} − {self.reference} holds (a ceiling at chance closes no gap)."
            )
        return "\n".join(lines)

    def text(self) -> str:
        """Caption and column-aligned markdown table, for terminals and report.md."""
        return f"{self.caption()}\n\n{aligned_markdown(self.table())}"

    def report(self, title: str = "slicefm evaluation · every task") -> tuple[str, str]:
        """(markdown, HTML page) of the summary."""
        caption = html.escape(self.caption()).replace("\n", "<br>")
        body = f"<h1>{html.escape(title)}</h1>\n<p>{caption}</p>\n{to_html(self.table())}"
        return f"# {title}\n\n{self.text()}\n", html_page(title, body)

    def paired_json(self) -> dict:
        return {t: {p: {s: d.to_dict() for s, d in per.items()} for p, per in ps.items()}
                for t, ps in self.paired.items()}  # fmt: skip

    @classmethod
    def from_results(cls, results: Mapping) -> Comparison:
        """The summary an evaluate run wrote to results.json ("macro", "paired", "paired_metric", ...)."""
        metric, macro = results["paired_metric"], {}
        for task, rows in results["macro"].items():
            for label, per in rows.items():
                row = RowKey.parse(label)
                macro.setdefault(task, {}).setdefault(row.protocol, {})[row.model] = Summary(**per[metric])
        paired = {t: {p: {s: PairedDiff(**d) for s, d in per.items()} for p, per in ps.items()}
                  for t, ps in results["paired"].items()}  # fmt: skip
        return cls(metric, results["paired_reference"], macro, paired)


def build_comparison(
    runs: Iterable[tuple[str, str, str, CVResult]], metric: str, reference: str = REFERENCE
) -> Comparison:
    """From (task, protocol, embedding set, cross-validation) runs; the sets of a task share its folds."""
    macro: dict[str, dict[str, dict[str, Summary]]] = {}
    folds: dict[str, dict[str, dict[str, list[float | None]]]] = {}
    for task, protocol, name, res in runs:
        macro.setdefault(task, {}).setdefault(protocol, {})[name] = res.summary["macro"][metric]
        folds.setdefault(task, {}).setdefault(protocol, {})[name] = fold_macros(res, metric)
    paired = {}
    for task, protocols in folds.items():
        for protocol, per in protocols.items():
            try:
                paired.setdefault(task, {})[protocol] = compare_sets(per, reference)
            except ValueError as e:
                raise ValueError(f"task {task}, {protocol}: {e}") from e
    return Comparison(metric, reference, macro, paired)


def _folds_cell(per: Mapping[str, Summary], diffs: Mapping[str, PairedDiff]) -> str:
    """Folds behind the paired differences (else behind the means); distinct counts joined by "/"."""
    counts = [d.n_folds for d in diffs.values()] or [s.n for s in per.values()]
    return "/".join(dict.fromkeys(str(n) for n in counts))


def _diff_cell(d: PairedDiff) -> str:
    if d.mean_diff is None:
        return d.verdict
    if d.ci_low is None or d.ci_high is None:
        return f"{d.mean_diff:+.3f} {d.verdict}"
    return f"{d.mean_diff:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}] {d.verdict}"


def aligned_markdown(table: Table) -> str:
    """A markdown table whose columns are padded to a common width (readable as plain text)."""
    esc = [[c.replace("|", "\\|") for c in row] for row in table]
    widths = [max(len(row[j]) for row in esc) for j in range(len(esc[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in esc]
    return "\n".join([lines[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *lines[1:]])
