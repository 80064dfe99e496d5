"""Export a trained run: `python export.py <run_dir|ckpt> [--out DIR] [--format FORMAT ...]`.

Formats: torchscript (model.ts), onnx (model.onnx, dynamic batch), safetensors (model.safetensors
plus config.json: plain weights for PyTorch, timm and the Hugging Face layout). Default: the first
two. preprocessing.json and classes.json go beside them, into <run_dir>/export/ by default; then
each file is checked to give the eager model's logits on CPU (exit status 1 if one differs by more
than --atol).
argparse, not Hydra: a one-off tool on a finished run, not an experiment.
"""

import argparse
import sys
from pathlib import Path

from gunn_exp import cli, rundir
from gunn_exp.errors import ConfigError
from gunn_exp.inference.export import FORMATS, example_input, export_run, max_differences
from gunn_exp.inference.run import load_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory, or a checkpoint inside one")
    parser.add_argument("--ckpt", default="best", help="best | last | <path>")
    parser.add_argument("--out", type=Path, help="output folder (default: <run_dir>/export)")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=["torchscript", "onnx"])
    parser.add_argument("--atol", type=float, default=1e-4, help="accepted logit difference")
    args = parser.parse_args()
    if not args.atol >= 0:  # also NaN
        raise ConfigError(f"--atol {args.atol}: a logit difference >= 0 (e.g. 1e-4).")
    cli.prepare(__file__, log_info=True)
    run = load_run(args.run, args.ckpt, "cpu")
    # Before any export work: a folder that cannot be written stops here, in one line.
    out_dir = rundir.writable_folder(args.out or run.output_dir / rundir.EXPORT, "--out")
    for path in export_run(run, out_dir, tuple(args.format)):
        print(f"wrote {path}")
    # A different batch size from the tracing example also checks that the batch is dynamic.
    diffs = max_differences(run.model, out_dir, example_input(run, batch=3))
    for name, diff in diffs.items():
        print(f"{name}: max |logit difference| from the eager model {diff:.2e}")
    bad = [name for name, diff in diffs.items() if diff > args.atol]
    if bad:
        print(
            f"error: {', '.join(bad)} differ from the eager model by more than {args.atol}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
