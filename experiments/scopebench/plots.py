"""Plots of the ScopeBench table (matplotlib, the optional ``plots`` extra: ``pip install -e '.[plots]'``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BUDGETS = (144, 64, 36)
CHANCE = {"overall": 27.2, "fine": 11.1, "attribute": 25.0, "global": 37.5}  # always the most frequent answer, %
MAIN = ("vanilla", "e1-k2", "e1-k6", "e1-k12", "e1-k24", "e3-2-6-14", "e3-2-6-24")


def _get(table, name, key):
    row = table.get(name)
    return (100 * row[key]["mean"], 100 * row[key]["std"]) if row else (float("nan"), 0.0)


def _save(fig, path: Path) -> Path:
    """Lays out, writes (110 dpi) and closes `fig`; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_budget(table: dict, output: Path, key: str = "overall") -> Path:
    """Accuracy against M for every projector of the main table (error bars: std over seeds), MLP as a line."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for offset, name in enumerate(MAIN):
        means, stds = zip(*(_get(table, f"{name}-m{m}", key) for m in BUDGETS), strict=True)
        xs = [i + (offset - 3) * 0.05 for i in range(len(BUDGETS))]
        style = "-o" if name.startswith("e3") else ("--s" if name == "vanilla" else ":^")
        ax.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=name)
    mlp, mlp_std = _get(table, "mlp", key)
    ax.axhline(mlp, color="black", linewidth=1, label=f"MLP, 576 tokens ({mlp:.1f})")
    ax.axhline(CHANCE[key], color="grey", linestyle=":", linewidth=1, label=f"chance ({CHANCE[key]})")
    ax.set_xticks(range(len(BUDGETS)), [f"M = {m}" for m in BUDGETS])
    ax.set_ylabel(f"test accuracy, {key} (%)")
    ax.set_title(f"ScopeBench: {key} accuracy by visual token budget")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, output / f"budget_{key}.png")


def plot_scopes(table: dict, output: Path, m: int = 64) -> Path:
    """Accuracy per scope (fine / attribute / global) for the main projectors at one M."""
    names = ["mlp"] + [f"{n}-m{m}" for n in MAIN]
    keys = ("fine", "attribute", "global")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.26
    for k, key in enumerate(keys):
        values = [_get(table, n, key) for n in names]
        ax.bar(
            [i + (k - 1) * width for i in range(len(names))],
            [v[0] for v in values],
            width,
            yerr=[v[1] for v in values],
            capsize=2,
            label=key,
        )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"ScopeBench accuracy by question scope (M = {m}; MLP: 576 tokens)")
    ax.legend()
    return _save(fig, output / f"scopes_m{m}.png")


def plot_ablation(table: dict, output: Path, m: int = 64) -> Path:
    """The beta sweep and the fusions at one M."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    betas = (0, 1, 2.5, 5, 10)
    names = [f"e3-2-6-14-beta{b:g}-m{m}" if b != 5 else f"e3-2-6-14-m{m}" for b in betas]
    for key in ("overall", "fine", "global"):
        means, stds = zip(*(_get(table, n, key) for n in names), strict=True)
        left.errorbar(betas, means, yerr=stds, fmt="-o", capsize=3, label=key)
    left.set_xlabel("beta")
    left.set_ylabel("test accuracy (%)")
    left.set_title(f"beta sweep (E = 3, k = {{2, 6, 14}}, M = {m})", fontsize=9)
    left.legend(fontsize=8)
    fusions = ("channel_mlp", "mean", "attention", "concat_mlp")
    names = [f"e3-2-6-14-m{m}"] + [f"e3-2-6-14-{f}-m{m}" for f in fusions[1:]]
    values = [_get(table, n, "overall") for n in names]
    right.bar(fusions, [v[0] for v in values], yerr=[v[1] for v in values], capsize=3)
    right.set_title(f"fusion (overall, M = {m})", fontsize=9)
    right.tick_params(axis="x", labelsize=8)
    return _save(fig, output / f"ablations_m{m}.png")


def plot_all(table: dict, output: Path) -> list[Path]:
    output = Path(output)
    return [
        plot_budget(table, output, "overall"),
        plot_budget(table, output, "fine"),
        plot_scopes(table, output),
        plot_ablation(table, output),
    ]
