"""Results as files a person reads: metrics JSON and a markdown table in the layout of the paper's Table 1.

    metrics = load_metrics("runs/x/eval/final")            # a metrics.json, or a folder holding one
    print(table1_markdown([("B-Coder", metrics)], ks=(1, 5), include_paper=True))

Table 1's layout: one row per model or checkpoint; for each k a block of columns, one per difficulty (APPS:
introductory, interview, competition) and "all". Values are percentages with two decimals; "–" where a metric
is undefined (fewer than k candidates) or absent. Suites without difficulties get one column per suite (when
several are mixed) and "all".

Which metric a row shows (`variant`): "pass" (plain pass@k), "ranked_pass" (top k by R̃, the CodeT protocol the
paper's B-Coder row uses), "filtered_pass" / "filtered_ranked_pass" (after dropping example-test failures), or
"auto": ranked where the metrics have R̃, plain otherwise. The row label says which.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from bcoder_ray.util.atomic import atomic_write_text
from bcoder_ray.evaluation.metrics import DIFFICULTY_ORDER, METRICS_FILE, METRICS_SCHEMA, VARIANTS

VARIANT_NAMES = {
    "pass": "pass@k",
    "ranked_pass": "ranked by R̃",
    "filtered_pass": "filtered",
    "filtered_ranked_pass": "filtered, ranked by R̃",
}


def variant_name(chosen: str, metrics: Mapping) -> str:
    """The variant's name in tables; a ranked variant names its ranker (CodeRL's critic ranks too, not R̃)."""
    name = VARIANT_NAMES[chosen]
    if "ranked" in chosen and str(metrics.get("ranker") or "").startswith("critic"):
        name = name.replace("R̃", "the critic")
    return name


SHORT_DIFFICULTY = {"introductory": "intro", "interview": "inter", "competition": "comp"}

# Section 7 of docs/bcoder.md: the paper's Table 1 (APPS test set, no example tests), in percent.
PAPER_TABLE1: dict[str, dict[str, dict[str, float]]] = {
    "CodeRL (770M), paper": {
        "1": {"introductory": 6.20, "interview": 1.50, "competition": 0.30, "all": 2.20},
        "5": {"introductory": 9.39, "interview": 1.90, "competition": 0.42, "all": 3.10}},
    "PPOCoder (770M), paper": {
        "1": {"introductory": 5.20, "interview": 1.00, "competition": 0.50, "all": 1.74},
        "5": {"introductory": 9.10, "interview": 2.50, "competition": 1.20, "all": 3.56}},
    "B-Coder (ranked, m=256, T=0.6), paper": {
        "1": {"introductory": 6.70, "interview": 1.50, "competition": 0.30, "all": 2.30},
        "5": {"introductory": 10.40, "interview": 2.63, "competition": 0.70, "all": 3.80}},
}


class ReportError(ValueError):
    """An unreadable or inconsistent results file; the message names it."""


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def load_metrics(path: str | os.PathLike) -> dict:
    """A metrics JSON written by `bcoder_ray.evaluation.evaluate` / `metrics_from_candidates`, or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except FileNotFoundError:
        raise ReportError(f"{path}: no such metrics file") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(metrics, dict) or metrics.get("schema") != METRICS_SCHEMA:
        raise ReportError(f"{path}: not a metrics file (expected \"schema\": {METRICS_SCHEMA!r})")
    return metrics


def row_label(metrics: Mapping) -> str:
    return str(metrics.get("label") or metrics.get("model") or "?")


def choose_variant(metrics: Mapping, variant: str = "auto") -> str:
    if variant == "auto":
        return "ranked_pass" if "ranked_pass@k" in metrics["overall"] else "pass"
    if variant not in VARIANTS:
        raise ReportError(f"unknown variant {variant!r}; expected 'auto' or one of {sorted(VARIANTS)}")
    return variant


def table_columns(entries: Sequence[Mapping]) -> list[str]:
    """The groups shown per k: difficulties in APPS order, then suites (when mixed), then "all"."""
    difficulties: set[str] = set()
    suites: set[str] = set()
    for m in entries:
        difficulties |= set(m.get("by_difficulty", {}))
        suites |= set(m.get("by_suite", {}))
    ordered = [d for d in DIFFICULTY_ORDER if d in difficulties] + sorted(difficulties - set(DIFFICULTY_ORDER))
    return ordered + [f"suite:{s}" for s in sorted(suites)] + ["all"]


def _group(metrics: Mapping, column: str) -> Mapping | None:
    if column == "all":
        return metrics["overall"]
    if column.startswith("suite:"):
        return metrics.get("by_suite", {}).get(column[len("suite:"):])
    return metrics.get("by_difficulty", {}).get(column)


def table1_rows(entries: Sequence[tuple[str | None, Mapping]], ks: Sequence[int] = (1, 5),
                variant: str = "auto", include_paper: bool = False) -> dict:
    """The table as data: {"ks", "columns", "rows": [{"label", "variant", "values": {str(k): {column: % or
    None}}}]}; `label` None takes the metrics' own label. Paper rows (percent, from docs/bcoder.md §7) last."""
    columns = table_columns([m for _, m in entries])
    rows = []
    for label, metrics in entries:
        chosen = choose_variant(metrics, variant)
        values: dict[str, dict[str, float | None]] = {}
        for k in ks:
            values[str(k)] = {}
            for column in columns:
                group = _group(metrics, column)
                value = None if group is None else group.get(f"{chosen}@k", {}).get(str(k))
                values[str(k)][column] = None if value is None else 100.0 * value
        m_max = metrics["overall"].get("m_max")
        sampling = metrics.get("sampling") or {}
        details = [variant_name(chosen, metrics), f"m={m_max}"]
        if sampling.get("temperature") is not None:
            details.append(f"T={sampling['temperature']:g}")
        rows.append({"label": f"{label or row_label(metrics)} ({', '.join(details)})", "variant": chosen,
                     "values": values})
    if include_paper:
        for label, by_k in PAPER_TABLE1.items():
            rows.append({"label": label, "variant": "paper",
                         "values": {str(k): {c: by_k.get(str(k), {}).get(c) for c in columns} for k in ks}})
    return {"ks": list(ks), "columns": columns, "rows": rows}


def _short(column: str) -> str:
    return SHORT_DIFFICULTY.get(column, column.replace("suite:", ""))


def table1_markdown(entries: Sequence[tuple[str | None, Mapping]], ks: Sequence[int] = (1, 5),
                    variant: str = "auto", include_paper: bool = False) -> str:
    """Table 1 as markdown: rows = models/checkpoints; columns = pass@k by difficulty, for each k."""
    table = table1_rows(entries, ks, variant, include_paper)
    header = ["model"] + [f"pass@{k} {_short(c)}" for k in table["ks"] for c in table["columns"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    for row in table["rows"]:
        cells = [row["label"]] + ["–" if row["values"][str(k)][c] is None else f"{row['values'][str(k)][c]:.2f}"
                                  for k in table["ks"] for c in table["columns"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_line(metrics: Mapping, k: int = 1, variant: str = "auto") -> str:
    """One line for logs: the chosen pass@k overall with its interval at k = 1."""
    chosen = choose_variant(metrics, variant)
    overall = metrics["overall"]
    value = overall.get(f"{chosen}@k", {}).get(str(k))
    text = f"{variant_name(chosen, metrics)} pass@{k} = " + ("–" if value is None else f"{100 * value:.2f}%")
    ci = overall.get(f"{chosen}@1_ci") if k == 1 else None
    if ci and value is not None:
        text += f" [{100 * ci['low']:.2f}, {100 * ci['high']:.2f}] ({100 * ci['level']:g}% CI)"
    return text + f" over {overall['n_problems']} problems, m={overall['m_max']}"
