"""The ScopeBench experiment: the paper's projector table in miniature, trained with `ms_llava.training.train`.

``python -m experiments.scopebench generate|encoder|warmup|grid-warmup|run|probe|readout|report|ship``
(README.md here has the commands and the results). Every variant starts from the same frozen vision tower and the
same warmed-up language model, gets a fresh projector (seeded) and runs the recipe's two stages with the same
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
import os
from pathlib import Path

import torch

from . import generator as sb
from .probe import probe_runs
from .report import readout_report, report
from .runs import STAGES, run_one, run_plan, variants, warm_up


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
    rd.add_argument("--steps", type=int, help="training steps (default readout.READOUT['steps'])")
    rd.add_argument("--reverse", action="store_true", help="go through the plan from its end (a second process)")
    rd.add_argument("--report", action="store_true", help="only aggregate RUNS/readout into --output")
    rd.add_argument("--output", default="experiments/scopebench/results")
    rep = commands.add_parser("report", help="aggregate results into OUTPUT (table.md, results.json, plots)")
    rep.add_argument("--output", default="experiments/scopebench/results")
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
