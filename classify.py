"""Classify images with a trained run: `python classify.py <run_dir|ckpt> <images or folders>...`

Prints the top-5 classes of every image, with the class names and preprocessing of the dataset the
run was trained on. Unreadable files are reported by name and skipped; the exit status is 1 when no
image could be read. argparse, not Hydra: this is a tool over a list of files, not an experiment.
"""

import argparse
import sys

from gunn_exp import cli
from gunn_exp.errors import ConfigError
from gunn_exp.inference.predict import classify_images
from gunn_exp.inference.run import list_images, load_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory, or a checkpoint inside one")
    parser.add_argument("images", nargs="+", help="image files, folders")
    parser.add_argument("--ckpt", default="best", help="best | last | <path>")
    parser.add_argument(
        "--top-k", "--top", dest="top_k", type=int, default=5, help="classes shown per image"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = parser.parse_args()
    cli.prepare(__file__, log_info=True)
    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: show at least one class per image (e.g. 5).")
    images = list_images(args.images)  # bad paths stop before the model is loaded
    run = load_run(args.run, args.ckpt, args.device)
    predictions, skipped = classify_images(run, images, args.top_k)
    width = max((len(name) for p in predictions for name, _ in p.top), default=0)
    for p in predictions:
        print(p.name)
        for rank, (name, prob) in enumerate(p.top, start=1):
            print(f"  {rank}. {name:<{width}}  {100 * prob:6.2f}%")
    print(
        f"{len(predictions)} image(s) classified by {run.model_name} ({run.checkpoint}); "
        f"{len(skipped)} skipped",
        file=sys.stderr,
    )
    return 0 if predictions else 1


if __name__ == "__main__":
    sys.exit(cli.run(main))
