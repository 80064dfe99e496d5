"""evaluate(cfg): re-evaluate a finished run's checkpoint on a test set (eval.py, conf/eval.yaml).

Model and data are rebuilt from `<run_dir>/config.yaml`, so no training override is repeated. A
`data=<name>` override replaces the run's data config as a whole (data modules take different
keys, so merging cifar100 over digits would mix them); `ten_crop`, `batch_size` and `num_workers`
change single keys; `ten_crop_reduce` says how ten crops are combined (eval's choice, like
`ten_crop`). The Trainer is `cfg.trainer`, the train.py group, as in lightning-hydra-template's
eval.yaml (`trainer=gpu`, `trainer.devices=[1]`, `+trainer.precision=bf16-mixed`).
Outputs go to `<run_dir>/eval/<ckpt>[_<data>][_tencrop[_softmax]][_first<N>]/`: results.json,
confusion_matrix.csv/.png (rows: true class, columns: predicted) and per_class_error.csv.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from gunn_exp import rundir
from gunn_exp.config import validate_config, without_hydra
from gunn_exp.data import ImageDataModule
from gunn_exp.errors import ConfigError, instantiate_config
from gunn_exp.extras import apply_extras
from gunn_exp.inference.run import CKPT_NAMES, load_run
from gunn_exp.rundir.build import build_datamodule
from gunn_exp.rundir.confusion import confusion_figure
from gunn_exp.task import ClassificationModule

log = logging.getLogger(__name__)

# The config tree shown at the start (extras.print_config).
EVAL_TREE = ("run_dir", "ckpt", "ckpt_path", "data", "trainer", "seed", "tags")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt` of run `cfg.run_dir` on the test split; return and write the results."""
    cfg = without_hydra(cfg)
    validate_config(cfg)
    apply_extras(cfg, EVAL_TREE)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True)
    run = load_run(*_run_and_checkpoint(cfg))  # on the CPU: the Trainer moves it
    data_cfg = _data_config(cfg, run.config)
    validate_config(OmegaConf.create({"data": data_cfg}))
    num_classes = int(run.model.num_classes)
    if data_cfg["num_classes"] != num_classes:
        raise ConfigError(
            f"data {data_cfg['name']} has {data_cfg['num_classes']} classes but the model of "
            f"{run.run_dir} predicts {num_classes}; evaluate on data with the model's label set, "
            f"or fine-tune first (train.py init_from=<ckpt>, see docs/USING_MODELS.md)."
        )
    dm: ImageDataModule = build_datamodule(data_cfg, f"data of {run.checkpoint}")
    dm.prepare_data()
    dm.setup("test")

    # The training module's own test step (same errors, crops combined alike, its confusion
    # matrix), by trainer.test.
    module = ClassificationModule(run.model, ten_crop_reduce=cfg.ten_crop_reduce)
    # Evaluation writes no logs or checkpoints; limit_batches, when set, wins over the trainer's.
    limit = {"limit_test_batches": cfg.limit_batches} if cfg.limit_batches else {}
    trainer: pl.Trainer = instantiate_config(
        cfg.trainer,
        "trainer",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **limit,
    )
    metrics = trainer.test(module, dataloaders=dm.test_dataloader(), verbose=False)[0]
    confusion = module.confusion.compute().cpu()
    results = {
        "run_dir": str(run.output_dir),
        "checkpoint": str(run.checkpoint),
        "epoch": run.epoch,
        "model": run.model_name,
        "data": data_cfg["name"],
        "ten_crop": bool(data_cfg.get("ten_crop", False)),
        "ten_crop_reduce": cfg.ten_crop_reduce if data_cfg.get("ten_crop") else None,
        "limit_batches": cfg.limit_batches,
        "task_name": cfg.task_name,
        "tags": list(cfg.tags or []),
        "images": int(confusion.sum()),
        "err1": metrics["test/err1"],
        "err5": metrics["test/err5"],
        "loss": metrics["test/loss"],
    }
    out_dir = run.output_dir / rundir.EVAL / _tag(cfg, data_cfg, run.checkpoint, run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results["output_dir"] = str(out_dir)
    rundir.write_results(results, out_dir)
    _write_confusion(confusion, dm.classes, out_dir)
    confusion_figure(confusion, dm.classes, _title(results)).savefig(
        out_dir / "confusion_matrix.png", dpi=110
    )
    log.info(
        f"{_title(results)}: top-1 error {results['err1']:.2f}%   top-5 error "
        f"{results['err5']:.2f}%   ({results['images']} test images)"
    )
    log.info(f"written to {out_dir}")
    return results


def _run_and_checkpoint(cfg: DictConfig) -> tuple[str, str]:
    """What to load: `run_dir` with `ckpt`, or `ckpt_path=<file.ckpt>` (lightning-hydra-template's
    key) whose run directory is found from its location (rundir.find_run_dir)."""
    ckpt_path, run_dir = cfg.get("ckpt_path"), cfg.get("run_dir")
    if ckpt_path:
        # With run_dir as well: a checkpoint kept outside its run (run_dir says which run).
        return (run_dir, ckpt_path) if run_dir else (ckpt_path, ckpt_path)
    if not run_dir:
        raise ConfigError(
            "nothing to evaluate: give run_dir=<run directory> [ckpt=best|last] or "
            "ckpt_path=<file.ckpt> (a checkpoint inside a run directory)."
        )
    return run_dir, cfg.ckpt


def _data_config(cfg: DictConfig, run_config: DictConfig) -> dict[str, Any]:
    """The data config to evaluate on: the run's, or `data=<name>`'s, with eval's key overrides."""
    source = cfg.data if cfg.get("data") else run_config.data
    data: dict[str, Any] = OmegaConf.to_container(source, resolve=True)  # type: ignore[assignment]
    if "ten_crop" in data:
        data["ten_crop"] = bool(cfg.ten_crop)  # eval's choice wins, so the output tag is true
    elif cfg.ten_crop:
        raise ConfigError(
            f"ten_crop=true: data {data['name']} has no ten-crop evaluation (only ImageNet-style "
            f"data, which resizes before cropping); drop ten_crop."
        )
    for key in ("batch_size", "num_workers"):
        if cfg[key] is not None:
            data[key] = cfg[key]
    return data


def _tag(cfg: DictConfig, data_cfg: dict[str, Any], checkpoint: Path, run_dir: Path) -> str:
    """The eval folder's name: the checkpoint's (best, last), then what else changes the result.
    A checkpoint from outside the run gets a digest of its path, so evaluating another run's
    last.ckpt against this run does not overwrite this run's own `last`."""
    ckpt = cfg.get("ckpt_path") or cfg.ckpt
    tag = ckpt if ckpt in CKPT_NAMES else Path(ckpt).stem
    if not Path(checkpoint).resolve().is_relative_to(Path(run_dir).resolve()):
        tag += "_" + hashlib.sha1(str(Path(checkpoint).resolve()).encode()).hexdigest()[:8]
    if cfg.get("data"):
        tag += f"_{data_cfg['name']}"
    if data_cfg.get("ten_crop"):
        # The authors' rule keeps the plain tag; the other one must not overwrite its results.
        tag += "_tencrop" if cfg.ten_crop_reduce == "logits" else f"_tencrop_{cfg.ten_crop_reduce}"
    if cfg.limit_batches is not None:
        tag += f"_first{cfg.limit_batches}"
    return tag


def _title(results: dict[str, Any]) -> str:
    crops = ", ten-crop" if results["ten_crop"] else ""
    return (
        f"{results['model']} ({Path(results['checkpoint']).name}, epoch {results['epoch']}) "
        f"on {results['data']}{crops}"
    )


def _write_confusion(confusion: Tensor, classes: list[str], out_dir: Path) -> None:
    """confusion_matrix.csv (counts; rows true, columns predicted) and per_class_error.csv."""
    with (out_dir / "confusion_matrix.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        rows = zip(classes, confusion.tolist(), strict=True)
        writer.writerows([name, *row] for name, row in rows)
    with (out_dir / "per_class_error.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "class", "images", "errors", "err1"])
        for i, (name, row) in enumerate(zip(classes, confusion.tolist(), strict=True)):
            images = sum(row)
            errors = images - row[i]
            err1 = f"{100 * errors / images:.2f}" if images else ""
            writer.writerow([i, name, images, errors, err1])
