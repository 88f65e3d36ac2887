"""``python -m benchmarks.method_comparison {list,run,report}`` (run from the repository root).

* ``list`` — the suites, their experiments, and whether each method is in fura's registry.
* ``run TARGET...`` — run suites (``commonsense``), single experiments (``commonsense/fura``) or experiment
  folders; resumable: what is finished is skipped. ``--grid-only`` trains and validates the learning-rate grid and
  stops (see :meth:`Runner.run`).
* ``report SUITE`` — check that the suite's runs are comparable, then write ``report.md``, ``summary.json`` and the
  plots to ``<results>/<suite>/report`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.method_comparison.data import default_data_root
from benchmarks.method_comparison.experiment import (
    EXPERIMENT_FILE,
    EXPERIMENTS_DIR,
    ExperimentError,
    load_experiment,
    resolve_targets,
    suite_dirs,
)
from benchmarks.method_comparison.report import ReportError, write_report
from benchmarks.method_comparison.runner import Paths, Runner


def build_parser() -> argparse.ArgumentParser:
    """The harness's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.method_comparison",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experiments-dir", type=Path, default=EXPERIMENTS_DIR, help="where the suites are")
    parser.add_argument("--results", type=Path, default=Paths.results, help="result files (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list suites and experiments")
    run = commands.add_parser("run", help="run suites or experiments (resumable)")
    run.add_argument("targets", nargs="+", help="a suite, suite/experiment, or an experiment folder")
    run.add_argument("--work", type=Path, default=Paths.work, help="data splits and run folders (default: %(default)s)")
    run.add_argument("--data-root", type=Path, default=default_data_root(), help="shared data (default: %(default)s)")
    run.add_argument("--corpus-cache", type=Path, default=Paths.corpus_cache, help="book corpus cache")
    run.add_argument(
        "--grid-only",
        action="store_true",
        help="only train and validate the grid points (to share a grid between processes; a later run tests)",
    )
    report = commands.add_parser("report", help="write the comparison of a suite")
    report.add_argument("suite")
    report.add_argument("--out", type=Path, help="output folder (default: <results>/<suite>/report)")
    report.add_argument("--reference", help="experiment the paired tests compare against (default: the fura one)")
    report.add_argument("--experiments", nargs="+", help="report only these experiments")
    return parser


def _list(root: Path) -> int:
    for suite in suite_dirs(root):
        print(f"{suite.name}:")
        for folder in sorted(p for p in suite.iterdir() if (p / EXPERIMENT_FILE).is_file()):
            experiment = load_experiment(folder)
            grid = ", ".join(f"{lr:g}" for lr in experiment.training.learning_rates)
            print(f"  {folder.name:<16} {experiment.method:<6} lr {{{grid}}} seeds {experiment.training.seeds}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "fura", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "list":
            return _list(args.experiments_dir)
        if args.command == "run":
            paths = Paths(
                work=args.work, results=args.results, data_root=args.data_root, corpus_cache=args.corpus_cache
            )
            written = Runner(paths).run(resolve_targets(args.targets, args.experiments_dir), args.grid_only)
            print("\n".join(str(p) for p in written))
            return 0
        out = write_report(args.results, args.suite, args.out, args.reference, args.experiments)
        print(out / "report.md")
        return 0
    except (ExperimentError, ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
