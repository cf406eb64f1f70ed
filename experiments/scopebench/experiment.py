"""The ScopeBench experiment: the paper's projector table in miniature, trained with `ms_llava.training.train`.

``python -m experiments.scopebench generate|encoder|warmup|grid-warmup|run|probe|readout|report|ship``
(docs/scopebench.md has the commands and the results). Every variant starts from the same frozen vision tower and
the same warmed-up language model, gets a fresh projector (seeded) and runs the recipe's two stages with the same
overridden settings (`STAGES`):

1. stage ``pretrain`` (projector only) on ``caption-train.json``;
2. stage ``finetune`` (projector + language model) on ``qa-train.json``;

then greedy exact-match accuracy per question type on ``qa-test.json`` (and ``qa-val.json``, which picks the shipped
default). Each run writes ``RUNS/results/<run>.json``; finished runs are skipped, so `run` can be restarted and split
over processes (``--worker i --workers n``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from . import generator as sb

# The recipe's settings overridden for a tiny model trained from a random start in minutes (the paper's lrs, 1e-3 /
# 2e-5, and one epoch of 558K / 665K examples move nothing here). Everything else is `TrainingConfig`'s default.
WARMUP = {"learning_rate": 3e-3, "global_batch_size": 16, "num_train_epochs": 2, "warmup_ratio": 0.05}
STAGES = {
    "pretrain": {"learning_rate": 3e-3, "global_batch_size": 16, "max_steps": 50, "warmup_ratio": 0.1},
    "finetune": {"learning_rate": 3e-3, "global_batch_size": 16, "max_steps": 500, "warmup_ratio": 0.05},
}
# The vision tower is frozen in both stages: its features are computed once per image (ms_llava.training.feature_cache; the
# losses are the same as without the cache) and shared by every run of the process.
COMMON = {
    "dataloader_num_workers": 0,
    "save_steps": 100000,
    "logging_steps": 10,
    "save_total_limit": 1,
    "cache_vision_features": True,
}
BUDGETS = (144, 64, 36)
ABLATION_M = 64


def variants() -> list[dict]:
    """Every row of the table: `{"name", "M", "kind", "resampler"}` (kind "mlp" or "ms")."""
    rows = [{"name": "mlp", "M": 576, "kind": "mlp", "resampler": None, "group": "main"}]
    for m in BUDGETS:
        specs = [("vanilla", {"scope_windows": [24], "scope_bias_strength": 0.0})]
        specs += [(f"e1-k{k}", {"scope_windows": [k]}) for k in (2, 6, 12, 24)]
        specs += [("e3-2-6-14", {"scope_windows": [2, 6, 14]}), ("e3-2-6-24", {"scope_windows": [2, 6, 24]})]
        for name, resampler in specs:
            rows.append({"name": f"{name}-m{m}", "M": m, "kind": "ms", "resampler": resampler, "group": "main"})
    for beta in (0.0, 1.0, 2.5, 10.0):  # beta = 5 is the main row e3-2-6-14
        rows.append(
            {
                "name": f"e3-2-6-14-beta{beta:g}-m{ABLATION_M}",
                "M": ABLATION_M,
                "kind": "ms",
                "resampler": {"scope_windows": [2, 6, 14], "scope_bias_strength": beta},
                "group": "beta",
            }
        )
    for fusion in ("mean", "attention", "concat_mlp"):  # channel_mlp is the main row
        rows.append(
            {
                "name": f"e3-2-6-14-{fusion}-m{ABLATION_M}",
                "M": ABLATION_M,
                "kind": "ms",
                "resampler": {"scope_windows": [2, 6, 14], "fusion": fusion},
                "group": "fusion",
            }
        )
    for row in rows:
        if row["resampler"] is not None:
            row["resampler"] = {"num_queries": row["M"], **row["resampler"]}
    return rows


def run_plan(seeds: list[int], extra_seed_names: list[str] | None = None, extra_seed: int | None = None):
    """(variant, seed) pairs: E = 3 rows first (the default checkpoint comes from them), then the rest."""
    plan = [(v, s) for s in seeds for v in variants()]
    if extra_seed is not None:
        plan += [(v, extra_seed) for v in variants() if v["name"] in (extra_seed_names or [])]
    return sorted(plan, key=lambda p: (p[1] not in seeds[:1], not p[0]["name"].startswith("e3-2-6-14-m"), p[1]))


# --------------------------------------------------------------------------------------------- steps


def _train(*args, **kwargs):
    from ms_llava.training import train

    return train(*args, **{**COMMON, **kwargs})


def warm_up(runs: Path, data: Path, log=print) -> Path:
    """Tokenizer + random LM -> text-only warm-up; returns the warmed-up checkpoint's folder (skipped when done)."""
    from .models import build_ms_llava, build_tokenizer

    out = runs / "warmup"
    if (out / "model.safetensors").exists():
        return out
    tokenizer = build_tokenizer()
    model, processor = build_ms_llava(None, None, tokenizer, {"num_queries": 36, "scope_windows": [2]})
    model.save_pretrained(runs / "random")
    processor.save_pretrained(runs / "random")
    result = _train(runs / "random", "finetune", data / "text-train.json", None, out, seed=0, **WARMUP)
    shutil.rmtree(runs / "random")
    log(f"warm-up: {result.global_step} steps, loss {result.train_loss:.4f}, {result.wall_time_s:.1f} s")
    _strip(out)
    return out


def _strip(directory: Path) -> None:
    """Removes Trainer checkpoints and copied remote-code modules from a finished run folder."""
    for path in directory.glob("checkpoint-*"):
        shutil.rmtree(path)
    for path in directory.glob("*_ms_llava.py"):
        path.unlink()


def claim_run(result_path: Path, name: str, log=print) -> Path | None:
    """Creates the run's lock file next to `result_path` and returns it; None when another process holds it (a
    crash leaves it behind: delete it)."""
    result_path.parent.mkdir(parents=True, exist_ok=True)
    lock = result_path.with_suffix(".lock")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        log(f"{name}: running elsewhere ({lock} exists), skipped")
        return None
    return lock


def build_variant(variant: dict, seed: int, runs: Path):
    """(model, processor) of `variant` with a fresh projector seeded with `seed`, RUNS/encoder's tower and
    RUNS/warmup's language model."""
    from transformers import AutoProcessor

    from .models import build_llava_mlp, build_ms_llava, language_model_from

    tokenizer = AutoProcessor.from_pretrained(runs / "warmup").tokenizer
    lm = language_model_from(runs / "warmup")
    if variant["kind"] == "mlp":
        return build_llava_mlp(runs / "encoder", lm, tokenizer, seed=seed)
    return build_ms_llava(runs / "encoder", lm, tokenizer, variant["resampler"], seed=seed)


def run_identity(variant: dict, seed: int) -> dict:
    """The keys every result file starts with (`aggregate` reads `variant`, `group`, `M`, `seed`)."""
    return {
        "run": f"{variant['name']}-s{seed}",
        "variant": variant["name"],
        "group": variant["group"],
        "M": variant["M"],
        "kind": variant["kind"],
        "resampler": variant["resampler"],
        "seed": seed,
    }


def run_one(variant: dict, seed: int, runs: Path, data: Path, log=print) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = f"{variant['name']}-s{seed}"
    result_path = runs / "results" / f"{name}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    lock = claim_run(result_path, name, log)
    if lock is None:
        return None
    started = time.perf_counter()
    folder = runs / "models" / name
    shutil.rmtree(folder, ignore_errors=True)
    model, processor = build_variant(variant, seed, runs)
    model.save_pretrained(folder / "init")
    processor.save_pretrained(folder / "init")
    stage1 = _train(folder / "init", "pretrain", data / "caption-train.json", data / "images", folder / "stage1", seed=seed,
                    **STAGES["pretrain"])  # fmt: skip
    stage2 = _train(folder / "stage1", "finetune", data / "qa-train.json", data / "images", folder / "stage2", seed=seed,
                    **STAGES["finetune"])  # fmt: skip
    shutil.rmtree(folder / "init")
    shutil.rmtree(folder / "stage1")
    _strip(folder / "stage2")
    trained = time.perf_counter() - started
    model = AutoModelForImageTextToText.from_pretrained(folder / "stage2", dtype=torch.float32)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    processor = AutoProcessor.from_pretrained(folder / "stage2")
    result = {
        **run_identity(variant, seed),
        "steps": {stage: STAGES[stage]["max_steps"] for stage in ("pretrain", "finetune")},
        "stages": {stage: dict(STAGES[stage]) for stage in ("pretrain", "finetune")},
        "stage1_loss": round(stage1.train_loss, 4),
        "stage2_loss": round(stage2.train_loss, 4),
        "stage2_last_loss": round(stage2.losses[-1][1], 4) if stage2.losses else None,  # none logged in < 10 steps
        "test": sb.question_type_accuracy(model, processor, data / "qa-test.json"),
    }
    if variant["kind"] == "ms" and len(variant["resampler"]["scope_windows"]) == 3:
        result["val"] = sb.question_type_accuracy(model, processor, data / "qa-val.json")
    result["train_wall_s"] = round(trained, 1)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    lock.unlink()
    log(f"{name}: test {result['test']['overall']:.3f} ({result['wall_s']:.0f} s)")
    return result


# --------------------------------------------------------------------------------------------- report


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


def probe_runs(runs: Path, data: Path, names: list[str], init_variants: list[str]):
    """Yields (name, probes) for finished runs and for fresh projectors (`init-<variant>`, seed 0); each result is
    also written to RUNS/probes/<name>.json."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .probe import probe_model

    by_name = {v["name"]: v for v in variants()}
    for name in [*names, *(f"init-{v}" for v in init_variants)]:
        if name.startswith("init-"):
            variant = by_name.get(name[len("init-") :])
            if variant is None or variant["kind"] != "ms":
                raise ValueError(f"--init takes MS-Resampler variant names, got {name[len('init-') :]!r}")
            model, processor = build_variant(variant, 0, runs)
        else:
            folder = runs / "models" / name / "stage2"
            if not folder.is_dir():
                raise ValueError(f"no finished run {name!r}: {folder} does not exist")
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
            processor = AutoProcessor.from_pretrained(folder)
        result = probe_model(model, processor, data)
        (runs / "probes").mkdir(exist_ok=True)
        (runs / "probes" / f"{name}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        yield name, result


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.scopebench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="scopebench-runs", help="working folder (default scopebench-runs)")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write the splits (LLaVA JSON + PNGs) to RUNS/data")
    for split, count in sb.DEFAULT_SIZES.items():
        gen.add_argument(f"--{split}", type=int, default=count, help=f"images in {split} (default {count})")
    enc = commands.add_parser("encoder", help="train the vision tower (dense per-patch objective) into RUNS/encoder")
    enc.add_argument("--images", type=int, default=1024)
    enc.add_argument("--epochs", type=int, default=6)
    commands.add_parser("warmup", help="tokenizer + random LM, then the text-only warm-up into RUNS/warmup")
    grid = commands.add_parser(
        "grid-warmup", help="exploration: RUNS/warmup's LM trained on oracle grids, saved to OUTPUT (a warm-up folder)"
    )
    grid.add_argument("--output", required=True, help="e.g. OTHER_RUNS/warmup (OTHER_RUNS with RUNS' data, encoder)")
    grid.add_argument("--steps", type=int, default=3000)
    grid.add_argument("--lr", type=float, default=1e-3)
    run = commands.add_parser("run", help="train and score the variants (resumable; results in RUNS/results)")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    run.add_argument("--extra-seed", type=int, help="a further seed for --extra-variants")
    run.add_argument("--extra-variants", nargs="*", default=[])
    run.add_argument("--only", nargs="*", help="run only these variant names")
    run.add_argument("--pretrain-steps", type=int, help=f"stage 1 steps (default {STAGES['pretrain']['max_steps']})")
    run.add_argument("--finetune-steps", type=int, help=f"stage 2 steps (default {STAGES['finetune']['max_steps']})")
    run.add_argument("--finetune-projector-lr", type=float, help="stage 2 learning rate of the projector alone")
    run.add_argument("--suffix", help="appended to the run names (e.g. -long1500), reported as a separate table")
    run.add_argument("--reverse", action="store_true", help="go through the plan from its end (a second process)")
    run.add_argument("--worker", type=int, default=0)
    run.add_argument("--workers", type=int, default=1)
    probe = commands.add_parser(
        "probe", help="linear probes on the visual tokens of runs (experiments.scopebench.probe)"
    )
    probe.add_argument("runs_to_probe", nargs="*", metavar="RUN", help="finished runs, e.g. e3-2-6-14-m64-s0")
    probe.add_argument("--init", nargs="*", default=[], metavar="VARIANT", help="variants with a fresh projector")
    rd = commands.add_parser(
        "readout", help="the projectors with a trained readout in place of the LM (experiments.scopebench.readout)"
    )
    rd.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    rd.add_argument("--only", nargs="*", help="only these variant names (default: the main table's rows)")
    rd.add_argument("--steps", type=int, help="training steps (default scopebench_readout.READOUT['steps'])")
    rd.add_argument("--reverse", action="store_true", help="go through the plan from its end (a second process)")
    rd.add_argument("--report", action="store_true", help="only aggregate RUNS/readout into --output")
    rd.add_argument("--output", default="docs/scopebench")
    rep = commands.add_parser("report", help="aggregate results into OUTPUT (table.md, results.json, plots)")
    rep.add_argument("--output", default="docs/scopebench")
    ship = commands.add_parser(
        "ship", help="copy the best E=3 run (by validation accuracy) into --output (e.g. the embedded default)"
    )
    ship.add_argument("--run", help="a run name (default: the best E = 3 run by validation accuracy)")
    ship.add_argument(
        "--output",
        required=True,
        help="the folder to write the checkpoint into (replaced); the package's embedded default is "
        "src/ms_llava/default_checkpoint",
    )
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    data = runs / "data"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.command == "generate":
        sizes = {split: getattr(args, split) for split in sb.DEFAULT_SIZES}
        for split, paths in sb.write_benchmark(data, sizes).items():
            print(split, *(str(p) for p in paths.values()))
    elif args.command == "encoder":
        from .models import train_encoder

        train_encoder(runs / "encoder", num_images=args.images, epochs=args.epochs)
    elif args.command == "warmup":
        print(warm_up(runs, data))
    elif args.command == "grid-warmup":
        from .models import grid_warm_up

        accuracy = grid_warm_up(runs / "warmup", Path(args.output), data, steps=args.steps, lr=args.lr)
        print(json.dumps(accuracy, indent=1))
    elif args.command == "run":
        plan = run_plan(args.seeds, args.extra_variants, args.extra_seed)
        if args.only:
            plan = [p for p in plan if p[0]["name"] in args.only]
        if args.pretrain_steps:
            STAGES["pretrain"]["max_steps"] = args.pretrain_steps
        if args.finetune_steps:
            STAGES["finetune"]["max_steps"] = args.finetune_steps
        if args.finetune_projector_lr:
            STAGES["finetune"]["projector_learning_rate"] = args.finetune_projector_lr
        if args.suffix:
            plan = [({**v, "name": f"{v['name']}{args.suffix}", "group": "long"}, s) for v, s in plan]
        if args.reverse:
            plan = plan[::-1]
        for position, (variant, seed) in enumerate(plan):
            if position % args.workers == args.worker:
                run_one(variant, seed, runs, data)
    elif args.command == "probe":
        for name, result in probe_runs(runs, data, args.runs_to_probe, args.init):
            print(name, json.dumps(result))
    elif args.command == "readout":
        from .readout import READOUT, readout_one

        if args.report:
            readout_report(runs, Path(args.output))
            return 0
        rows = {v["name"]: v for v in variants()}
        unknown = [name for name in args.only or [] if name not in rows]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; the variants are {sorted(rows)}")
        names = args.only or [name for name, v in rows.items() if v["group"] == "main"]
        plan = [(rows[name], seed) for seed in args.seeds for name in names]
        for variant, seed in plan[::-1] if args.reverse else plan:
            readout_one(variant, seed, runs, steps=args.steps or READOUT["steps"])
    elif args.command == "report":
        report(runs, Path(args.output))
    elif args.command == "ship":
        from .ship import ship_default

        ship_default(runs, Path(args.output), args.run)
    return 0
