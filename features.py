"""Extract features with a trained run: `python features.py <run_dir|ckpt> <images or folders>...
-o features.npy` (or .pt).

Writes the pooled penultimate features (the classifier's input) of every image, with the file
names: `.npy` gets a `<stem>.names.txt` beside it (one name per row), `.pt` is one dict
{features, names, model, checkpoint}. Unreadable files are reported by name and skipped.
argparse, not Hydra: this is a tool over a list of files, not an experiment.
"""

import argparse
import sys
from pathlib import Path

from gunn_exp import cli, rundir
from gunn_exp.errors import ConfigError
from gunn_exp.inference.predict import extract_features, save_features
from gunn_exp.inference.run import list_images, load_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory, or a checkpoint inside one")
    parser.add_argument("images", nargs="+", help="image files, folders")
    parser.add_argument("-o", "--output", required=True, help="output file, .npy or .pt")
    parser.add_argument("--ckpt", default="best", help="best | last | <path>")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = parser.parse_args()
    if not args.output.endswith((".npy", ".pt")):
        parser.error(f"--output {args.output}: must end in .npy or .pt")
    cli.prepare(__file__, log_info=True)
    # Bad paths, in and out, stop before the model is loaded.
    if Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a folder; give a file ending in .npy or .pt.")
    rundir.writable_folder(Path(args.output).parent, "--output")
    images = list_images(args.images)
    run = load_run(args.run, args.ckpt, args.device)
    names, features, skipped = extract_features(run, images)
    if not names:
        print("error: no image could be read; nothing written.", file=sys.stderr)
        return 1
    written = save_features(args.output, names, features, run)
    print(
        f"{features.shape[0]} x {features.shape[1]} features of {run.model_name} "
        f"({run.checkpoint}) -> {', '.join(map(str, written))}; {len(skipped)} skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
