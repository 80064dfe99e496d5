"""Tabulate finished runs beside the paper: `python report.py logs/ablation/multiruns/* --out r`.

Arguments are results.json files, run or sweep directories, or glob patterns (default: logs/).
Prints the markdown report; with --out PREFIX also writes PREFIX.md, PREFIX.csv and PREFIX.png.

argparse, not Hydra: the report composes no config, it reads run directories; Hydra would open a
run directory and log file of its own for a read-only tool, and its override grammar gives `*`
and `,` (common in paths and globs) meanings of their own.
"""

import argparse
import sys
from pathlib import Path

from gunn_exp import cli, rundir
from gunn_exp.analysis.report import load_runs, markdown_report, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["logs"], help="results.json, dirs or globs")
    parser.add_argument("--out", type=Path, help="write OUT.md, OUT.csv and OUT.png")
    parser.add_argument("--title", default="Results", help="heading of the report and figure")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure")
    args = parser.parse_args(argv)
    if args.out:  # before the runs are read: a folder that cannot be written stops here
        rundir.writable_folder(args.out.parent, "--out")
    runs = load_runs(args.paths)
    if not runs:
        print(f"report: no results.json under {' '.join(args.paths)}.", file=sys.stderr)
        return 2
    print(markdown_report(runs, args.title))
    if args.out:
        for path in write_report(runs, args.out, args.title, plot=not args.no_plot):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
