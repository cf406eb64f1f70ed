"""The ScopeBench tables: aggregation over seeds, the Markdown tables, the paper's claims checked as differences of
means against their noise, and the plots (`report` for the end-to-end runs, `readout_report` for the readout runs)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from . import generator as sb
from .runs import ABLATION_M, BUDGETS


def load_results(runs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((runs / "results").glob("*.json"))]


def aggregate(results: list[dict], split: str = "test") -> dict[str, dict]:
    """Per variant: mean and spread (sample standard deviation; 0 for one seed) of each accuracy, and the seeds."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    table = {}
    for name, runs in by_variant.items():
        keys = runs[0][split].keys()
        stats = {}
        for key in keys:
            values = [r[split][key] for r in runs]
            stats[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        table[name] = {"M": runs[0]["M"], "group": runs[0]["group"], "seeds": [r["seed"] for r in runs], **stats}
    return table


def _cell(stat: dict) -> str:
    """`mean ± std` over the seeds; the bare value for one seed (it has no spread to show)."""
    if len(stat["values"]) == 1:
        return f"{100 * stat['mean']:.1f}"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def markdown_table(table: dict, names: list[str]) -> str:
    columns = ["overall", "fine", "attribute", "global", *sb.QUESTION_TYPES]
    lines = [
        "| variant | M | seeds | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for name in names:
        if name not in table:
            continue
        row = table[name]
        cells = [_cell(row[c]) for c in columns]
        lines.append(f"| {name} | {row['M']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


NUM_TEST_QUESTIONS = 1500  # questions each test score is computed on; `report` reads it from RUNS/data


def _standard_error(row: dict, key: str = "overall") -> float:
    """Of a variant's mean accuracy: the larger of the seed spread's (std / sqrt(seeds)) and the binomial one of the
    test questions it was scored on (seeds x NUM_TEST_QUESTIONS)."""
    stat, seeds = row[key], len(row["seeds"])
    binomial = math.sqrt(max(stat["mean"] * (1 - stat["mean"]), 1e-9) / (NUM_TEST_QUESTIONS * seeds))
    return max(stat["std"] / math.sqrt(seeds), binomial)


def verdict(table: dict, first: str, second: str, key: str = "overall") -> tuple[float, str, float]:
    """(difference, 'higher' | 'lower' | 'within noise', twice the standard error of the difference): within noise
    when the difference is under two standard errors."""
    a, b = table[first], table[second]
    difference = a[key]["mean"] - b[key]["mean"]
    noise = 2 * math.hypot(_standard_error(a, key), _standard_error(b, key))
    word = "within noise" if abs(difference) < noise else ("higher" if difference > 0 else "lower")
    return difference, word, noise


def compare(table: dict, first: str, second: str, key: str = "overall") -> str:
    """The difference with `verdict`'s word and noise, as text."""
    difference, word, noise = verdict(table, first, second, key)
    return f"{100 * difference:+.1f} points ({word}; 2 SE = {100 * noise:.1f})"


def claims(table: dict) -> list[str]:
    """The issue's claims, checked on test means (missing rows raise KeyError)."""
    out = []

    def mean(name, key="overall"):
        return table[name][key]["mean"]

    gaps, gap_verdicts = {}, {}
    for m in BUDGETS:
        singles = [f"e1-k{k}-m{m}" for k in (2, 6, 12, 24) if f"e1-k{k}-m{m}" in table]
        multis = [f"e3-{w}-m{m}" for w in ("2-6-14", "2-6-24") if f"e3-{w}-m{m}" in table]
        vanilla = f"vanilla-m{m}"
        if not singles or not multis or vanilla not in table:
            out.append(f"M = {m}: not all rows ran (single {singles}, multi {multis}, vanilla {vanilla in table})")
            continue
        best_single, best_multi = max(singles, key=mean), max(multis, key=mean)
        gaps[m] = mean(best_multi) - mean(vanilla)
        gap_verdicts[m] = verdict(table, best_multi, vanilla)[1]
        out.append(
            f"M = {m}: best E=3 `{best_multi}` {100 * mean(best_multi):.1f} vs best E=1 `{best_single}` "
            f"{100 * mean(best_single):.1f}: {compare(table, best_multi, best_single)}; best E=1 vs vanilla "
            f"{100 * mean(vanilla):.1f}: {compare(table, best_single, vanilla)}; on the fine (digit) question, best E=3 "
            f"vs vanilla: {compare(table, best_multi, vanilla, 'fine')}"
        )
    if len(gaps) == len(BUDGETS):
        widening = gaps[36] > gaps[64] > gaps[144]
        out.append(
            "gap best E=3 - vanilla: "
            + ", ".join(f"M = {m}: {100 * g:+.1f} ({gap_verdicts[m]})" for m, g in gaps.items())
            + f" points: {'widens' if widening else 'does not widen monotonically'} as M shrinks"
            + ("" if all(v != "within noise" for v in gap_verdicts.values()) else ", but not every gap is above noise")
        )
    e3 = [f"e3-{w}-m144" for w in ("2-6-14", "2-6-24") if f"e3-{w}-m144" in table]
    if e3 and "mlp" in table:
        best = max(e3, key=mean)
        out.append(f"M = 144 `{best}` vs MLP over 576 tokens: {compare(table, best, 'mlp')}")
    return out


def main_row_names() -> list[str]:
    """The main table's rows in the order the tables print them: the MLP, then each M's projectors."""
    return ["mlp"] + [
        f"{n}-m{m}"
        for m in BUDGETS
        for n in ("vanilla", "e1-k2", "e1-k6", "e1-k12", "e1-k24", "e3-2-6-14", "e3-2-6-24")
    ]


def report(runs: Path, output: Path, log=print) -> dict:
    """Writes `output/results.json`, `output/table.md` and the plots; returns the aggregated table."""
    global NUM_TEST_QUESTIONS
    test_file = runs / "data" / "qa-test.json"
    if test_file.exists():
        NUM_TEST_QUESTIONS = len(json.loads(test_file.read_text(encoding="utf-8")))
    results = load_results(runs)
    table = aggregate(results)
    output.mkdir(parents=True, exist_ok=True)
    main_names = main_row_names()
    beta_names = [f"vanilla-m{ABLATION_M}"] + [
        f"e3-2-6-14-beta{b:g}-m{ABLATION_M}" if b != 5 else f"e3-2-6-14-m{ABLATION_M}" for b in (0, 1, 2.5, 5, 10)
    ]
    fusion_names = [f"e3-2-6-14-m{ABLATION_M}"] + [
        f"e3-2-6-14-{f}-m{ABLATION_M}" for f in ("mean", "attention", "concat_mlp")
    ]
    text = ["## Main table (test accuracy, %, mean ± std over seeds)", "", markdown_table(table, main_names), ""]
    text += [f"## beta sweep (E = 3, k = {{2, 6, 14}}, M = {ABLATION_M})", "", markdown_table(table, beta_names), ""]
    text += [f"## Fusion (E = 3, k = {{2, 6, 14}}, M = {ABLATION_M})", "", markdown_table(table, fusion_names), ""]
    long_names = sorted(n for n, row in table.items() if row["group"] == "long")
    if long_names:
        text += [
            "## Other schedules and settings (the name's suffix says which)",
            "",
            markdown_table(table, long_names),
            "",
        ]
    try:
        text += ["## Claims (test means)", ""] + [f"- {c}" for c in claims(table)]
    except KeyError as error:  # a row the claims need has not run yet
        text += ["## Claims", "", f"not evaluated: no result yet for {error}"]
    walls = [r["wall_s"] for r in results]
    text += ["", f"{len(results)} runs, {sum(walls):.0f} s of run time in all (mean {statistics.fmean(walls):.0f} s)."]
    (output / "table.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    (output / "results.json").write_text(json.dumps({"runs": results, "table": table}, indent=1), encoding="utf-8")
    try:
        from .plots import plot_all

        plot_all(table, output)
    except ImportError as error:  # matplotlib is the optional `plots` extra
        log(f"no plots ({error}); pip install -e '.[plots]'")
    log("\n".join(text))
    return table


def readout_report(runs: Path, output: Path, log=print) -> dict:
    """The readout experiment's table (`experiments.scopebench.readout`): `output/readout-table.md` and
    `output/readout-results.json`, from RUNS/readout; the same aggregation and claim checks as `report`."""
    results = [json.loads(p.read_text()) for p in sorted((runs / "readout").glob("*.json"))]
    if not results:
        raise ValueError(f"no readout results in {runs / 'readout'}; run the readout command first")
    table = aggregate(results)
    main_names = main_row_names()
    others = sorted(n for n in table if n not in main_names)
    text = ["## Readout table (test accuracy, %, mean ± std over seeds)", "", markdown_table(table, main_names), ""]
    if others:
        text += ["## Other readout rows", "", markdown_table(table, others), ""]
    try:
        text += ["## Claims (test means)", ""] + [f"- {c}" for c in claims(table)]
    except KeyError as error:
        text += ["## Claims", "", f"not evaluated: no result yet for {error}"]
    walls = [r["wall_s"] for r in results]
    steps = sorted({r["readout"]["steps"] for r in results})
    text += ["", f"{len(results)} runs ({steps} steps), {sum(walls):.0f} s of run time in all."]
    output.mkdir(parents=True, exist_ok=True)
    (output / "readout-table.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    (output / "readout-results.json").write_text(json.dumps({"runs": results, "table": table}, indent=1), "utf-8")
    log("\n".join(text))
    return table
