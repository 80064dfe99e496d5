"""Config checks that run before anything is built: one error naming the key, value and fix.

Imports neither torch nor Lightning (only the model registry checks do, on demand), so the root
scripts validate a composed config within a few seconds, before the heavy imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from gunn_exp.data.crops import CROP_REDUCTIONS
from gunn_exp.errors import ConfigError

_MISSING = object()


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _non_negative_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _positive_number(v: Any) -> bool:
    return _non_negative_number(v) and v > 0


def _batch_limit(v: Any) -> bool:
    """Lightning's limit_*_batches: a batch count >= 1 or a fraction in (0, 1]; 0 trains nothing."""
    if isinstance(v, bool):
        return False
    return v is None or (isinstance(v, int) and v > 0) or (isinstance(v, float) and 0 < v <= 1)


def _switch(v: Any) -> bool:
    """A yes/no key: YAML's true/false only. OmegaConf keeps `test=no` as the string "no", which
    Python's `if` would read as true."""
    return isinstance(v, bool)


def _seed(v: Any) -> bool:
    """numpy's seed range, which Lightning's seed_everything and sklearn's splits pass it to."""
    return _non_negative_int(v) and v < 2**32


def _milestones(v: Any) -> bool:
    """Whole epochs: MultiStepLR compares them with its step count, so a fraction (0.5) never
    matches and the learning rate silently never drops."""
    if not isinstance(v, Sequence) or isinstance(v, str):
        return False
    return all(_non_negative_int(m) for m in v)


def _one_of(choices: Callable[[], Sequence[Any]]) -> Callable[[Any], bool]:
    return lambda v: v in choices()


def _model_names() -> list[str]:
    from gunn_exp.models import list_models

    return list_models()


def _impl_names() -> list[Any]:
    from gunn_exp.models import IMPLEMENTATIONS

    return [None, *sorted(IMPLEMENTATIONS)]


# The names ClassificationModule logs during fit; `optimized_metric` must be one of them (test
# metrics are not: choosing a model on the test set would make its test error meaningless).
METRICS = [
    *(f"{stage}/{name}" for stage in ("train", "val") for name in ("loss", "err1", "err5")),
    "val/err1_best",
]

# Also logged during fit, per step or per epoch; a callback may monitor these too.
STEP_METRICS = ["train/loss_step", "lr", "lr_step"]
# Families of metrics that callbacks log under their own prefix (Throughput, the singularity
# probe, a user's own): their names are not known before the run, so a monitor on them passes.
_OWN_STAGES = ("train/", "val/", "test/")

Check = tuple[Callable[[Any], bool], Callable[[], str] | str]

# key -> (predicate, what a valid value looks like). Keys absent from a config are skipped.
# Against the model registry: these import torch.
REGISTRY_CHECKS: dict[str, Check] = {
    "model.name": (_one_of(_model_names), lambda: f"one of {_model_names()}"),
    "model.impl": (_one_of(_impl_names), lambda: f"one of {_impl_names()}"),
}
CHECKS: dict[str, Check] = {
    "seed": (lambda v: v is None or _seed(v), "null or an integer in [0, 2**32)"),
    "data.split_seed": (_seed, "an integer in [0, 2**32) (fixes the train/val/test split)"),
    **{
        key: (_switch, "true or false")
        for key in (
            "train",
            "test",
            "allow_config_change",
            "print_config",
            "channels_last",
            "compile",
            "data.download",
            "data.ten_crop",
            "data.jigsaw",
            "data.verify_checksums",
            "data.on_device",
            "extras.ignore_warnings",
            "extras.enforce_tags",
        )
    },
    "optimized_metric": (
        _one_of(lambda: METRICS),
        f"a logged metric to minimise, one of {METRICS}",
    ),
    "limit_batches": (_batch_limit, "null, a number of batches >= 1 or a fraction in (0, 1]"),
    "ten_crop_reduce": (_one_of(lambda: CROP_REDUCTIONS), f"one of {CROP_REDUCTIONS}"),
    "model.update": (_one_of(lambda: ["gradual", "simultaneous"]), "gradual or simultaneous"),
    "model.gunnify.segments": (
        lambda v: v is None or _positive_int(v),
        "null (off) or a positive integer (K channel segments)",
    ),
    "model.gunnify.update": (
        _one_of(lambda: ["gradual", "simultaneous"]),
        "gradual or simultaneous",
    ),
    "model.gunnify.mode": (_one_of(lambda: ["exact", "split"]), "exact or split"),
    "model.num_classes": (_positive_int, "a positive integer"),
    "data.batch_size": (_positive_int, "a positive integer (the global batch)"),
    "data.num_workers": (_non_negative_int, "an integer >= 0"),
    "data.image_size": (_positive_int, "a positive integer (pixels)"),
    "data.val_size": (_non_negative_int, "an integer >= 0 (held-out training images)"),
    "data.train_fraction": (
        lambda v: _positive_number(v) and v <= 1,
        "a number in (0, 1] (the fraction of the training images trained on)",
    ),
    "data.check_images": (
        lambda v: v == "all" or _non_negative_int(v),
        "an integer >= 0 (images decoded per split before training) or all",
    ),
    "trainer.max_epochs": (_positive_int, "a positive integer"),
    "trainer.min_epochs": (
        lambda v: v is None or _non_negative_int(v),
        "an integer >= 0 (epochs before early stopping may stop the run), or null",
    ),
    # Lightning divides by these (0 is a ZeroDivisionError at the first step) or takes a
    # negative clip norm without a word.
    "trainer.accumulate_grad_batches": (_positive_int, "a positive number of batches"),
    "trainer.check_val_every_n_epoch": (
        lambda v: v is None or _positive_int(v),
        "a positive number of epochs, or null (validate by val_check_interval alone)",
    ),
    "trainer.val_check_interval": (
        lambda v: _batch_limit(v) and v != 0,
        "a number of batches >= 1 or a fraction of the epoch in (0, 1]",
    ),
    "trainer.gradient_clip_val": (
        lambda v: v is None or _non_negative_number(v),
        "a number >= 0, or null (no clipping)",
    ),
    "trainer.limit_train_batches": (
        _batch_limit,
        "a number of batches >= 1 or a fraction in (0, 1] (0 would train nothing)",
    ),
    "trainer.limit_val_batches": (
        _batch_limit,
        "a number of batches >= 1 or a fraction in (0, 1]: validation picks best.ckpt "
        "(val/err1_best), so 0 cannot run; validate less often with "
        "trainer.check_val_every_n_epoch",
    ),
    "trainer.limit_test_batches": (
        _batch_limit,
        "a number of batches >= 1 or a fraction in (0, 1] (0 would test nothing: skip the test "
        "with test=false)",
    ),
    "trainer.max_steps": (
        lambda v: v is None or v == -1 or _positive_int(v),
        "-1 (no step limit: trainer.max_epochs decides) or a positive number of steps",
    ),
    "scheduler.milestones": (
        _milestones,
        "whole epochs (0-based scheduler steps), e.g. [149,224] for drops at epochs 150 and 225 "
        "of 300; the default computes them from fractions of trainer.max_epochs",
    ),
    "scheduler.T_max": (_positive_int, "a positive number of epochs (the cosine period)"),
    "scheduler.gamma": (_positive_number, "a positive number (the lr factor at each milestone)"),
    "scheduler.lr_lambda.gamma": (_positive_number, "a positive number (the lr factor per step)"),
    "scheduler.lr_lambda.period": (_positive_int, "a positive number of epochs per step"),
    **{
        f"callbacks.singularity.{key}": (_positive_int, "a positive integer")
        for key in (
            "every_n_epochs",
            "probe_size",
            "max_samples",
            "hessian_size",
            "hessian_steps",
            "hessian_vectors",
        )
    },
    "callbacks.singularity.gamma_eps": (_non_negative_number, "a number >= 0"),
    "callbacks.early_stopping.patience": (_non_negative_int, "an integer >= 0 (epochs)"),
    "optimizer.lr": (_positive_number, "a positive number"),
    "optimizer.weight_decay": (_non_negative_number, "a number >= 0"),
    "optimizer.momentum": (
        lambda v: _non_negative_number(v) and v < 1,
        "a number in [0, 1) (at 1 or more SGD's steps grow without bound)",
    ),
    "logger.wandb.log_model": (
        lambda v: v is True or v is False or v == "all",
        "true (best and last checkpoints when training ends), all (at every save) or false",
    ),
}


def _check_num_classes(cfg: DictConfig) -> None:
    """A classifier with fewer outputs than the data has labels fails only inside the loss."""
    model = OmegaConf.select(cfg, "model.num_classes")
    data = OmegaConf.select(cfg, "data.num_classes")
    if _positive_int(model) and _positive_int(data) and model < data:
        raise ConfigError(
            f"model.num_classes={model} is smaller than data.num_classes={data} (labels go up to "
            f"{data - 1}); set model.num_classes={data} or drop the override (it follows the data)."
        )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _has_mps() -> bool:
    import torch

    return torch.backends.mps.is_available()


def _check_accelerator_present(cfg: DictConfig) -> None:
    """`trainer=gpu` or `trainer=mps` on a machine without that device (train.py, eval.py)."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator"))
    if accelerator in ("gpu", "cuda") and not _has_cuda():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: this machine has no CUDA GPU (torch sees none); "
            f"use trainer=cpu (or trainer.accelerator=auto, which falls back to the CPU)."
        )
    if accelerator == "mps" and not _has_mps():
        raise ConfigError(
            "trainer.accelerator=mps: this machine has no Apple GPU (torch.backends.mps is not "
            "available); use trainer=cpu (or trainer.accelerator=auto)."
        )


def processes(cfg: DictConfig) -> int | None:
    """How many training processes `cfg.trainer` starts (devices x nodes), None when only the
    hardware knows (devices=-1/auto on a CPU)."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, str) and "," in devices:  # "0,1": device ids
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        count = len(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    elif devices in (-1, "auto") and str(OmegaConf.select(cfg, "trainer.accelerator")) in (
        "gpu",
        "cuda",
    ):
        import torch

        count = torch.cuda.device_count()
    else:
        return None
    return count * nodes if _positive_int(nodes) else None


def _check_batch_split(cfg: DictConfig) -> None:
    """data.batch_size is the global batch: each of the N processes takes batch_size / N."""
    batch = OmegaConf.select(cfg, "data.batch_size")
    world = processes(cfg) if OmegaConf.select(cfg, "trainer") is not None else None
    if _positive_int(batch) and world and batch % world:
        lower = max(batch - batch % world, world)
        raise ConfigError(
            f"data.batch_size={batch} (the global batch) is not divisible by the {world} "
            f"processes of this run (trainer.devices x trainer.num_nodes); use a multiple of "
            f"{world}, e.g. data.batch_size={lower}."
        )


# compile modes that capture CUDA graphs, and the GUNN implementations that break under them.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
CUDA_GRAPH_UNSAFE_IMPLS = ("keep_convs", "recompute")


def _check_cuda_graphs(cfg: DictConfig) -> None:
    """compile with CUDA graphs on the GPU and a whole-layer GUNN implementation: measured to fail
    at the first backward pass on an H200 (docs/PERFORMANCE.md), so it stops before the run."""
    mode = OmegaConf.select(cfg, "compile_mode")
    if not OmegaConf.select(cfg, "compile") or mode not in CUDA_GRAPH_MODES:
        return
    impl = OmegaConf.select(cfg, "model.impl", default=_MISSING)
    if impl is _MISSING:
        return  # a model without GUNN layers
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator"))
    if accelerator not in ("gpu", "cuda") and not (accelerator == "auto" and _has_cuda()):
        return  # no CUDA graphs off the GPU
    from gunn_exp.models.layer import DEFAULT_IMPL

    impl = impl or DEFAULT_IMPL
    if impl in CUDA_GRAPH_UNSAFE_IMPLS:
        raise ConfigError(
            f"compile_mode={mode} with model.impl={impl} fails on the GPU (its CUDA graphs "
            f"overwrite a segment output that the layer's backward still reads; docs/"
            f"PERFORMANCE.md); use model.impl=reference with compile_mode={mode}, or "
            f"compile_mode=null (regional compile without CUDA graphs) with model.impl={impl}."
        )


# Logger classes whose library is optional: (modules, any of which serves, the pyproject extra).
LOGGER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "loggers"),
    "MLFlowLogger": (("mlflow",), "loggers"),
    "CometLogger": (("comet_ml",), "comet"),
    "AimLogger": (("aim",), "aim"),
}
# Loggers the installed Lightning no longer provides: why, what to use.
RETIRED_LOGGERS = {
    "NeptuneLogger": "Neptune has shut down and Lightning 2.6 removed its NeptuneLogger",
}


def _check_logger_packages(cfg: DictConfig) -> None:
    """A logger whose library is not installed stops here, naming the extra that installs it,
    not at the first import inside Lightning after the data and model are built."""
    from importlib.util import find_spec

    for name, conf in (OmegaConf.select(cfg, "logger") or {}).items():
        target = str(conf.get("_target_", "")) if isinstance(conf, DictConfig) else ""
        kind = target.rpartition(".")[2]
        if kind in RETIRED_LOGGERS:
            raise ConfigError(
                f"logger={name} ({target}) cannot run: {RETIRED_LOGGERS[kind]}; use logger=wandb, "
                f'mlflow, tensorboard, comet or aim (README "Logging").'
            )
        modules, extra = LOGGER_PACKAGES.get(kind, ((), ""))
        if modules and not any(find_spec(m) for m in modules):
            raise ConfigError(
                f"logger={name} needs the {modules[0]} package, which is not installed: "
                f"pip install -e '.[{extra}]' (README \"Logging\")."
            )


def _check_monitors(cfg: DictConfig) -> None:
    """A callback monitoring a metric that is never logged (`val/acc`, a typo) fails only after
    the first epoch, when Lightning looks for it; names in our own families are known now."""
    known = METRICS + STEP_METRICS + ["epoch", "step"]  # ModelCheckpoint's "keep the latest k"
    for name, conf in (OmegaConf.select(cfg, "callbacks") or {}).items():
        monitor = conf.get("monitor") if isinstance(conf, DictConfig) else None
        if monitor is None or monitor in known:
            continue
        if str(monitor).startswith(_OWN_STAGES) or "/" not in str(monitor):
            raise ConfigError(
                f"callbacks.{name}.monitor={monitor!r} is never logged during fit (errors are "
                f"logged, not accuracies); use one of {known}."
            )


def _check_epochs(cfg: DictConfig) -> None:
    """Lightning stops at max_epochs whatever min_epochs asks for, and skips validation whose
    interval is longer than the run, without a word."""
    low = OmegaConf.select(cfg, "trainer.min_epochs")
    high = OmegaConf.select(cfg, "trainer.max_epochs")
    if _non_negative_int(low) and _positive_int(high) and low > high:
        raise ConfigError(
            f"trainer.min_epochs={low} is more than trainer.max_epochs={high}: the run would "
            f"stop at {high}; raise trainer.max_epochs or lower trainer.min_epochs."
        )
    every = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch")
    if _positive_int(every) and _positive_int(high) and every > high:
        raise ConfigError(
            f"trainer.check_val_every_n_epoch={every} is more than trainer.max_epochs={high}: "
            f"the run would never validate, so no best.ckpt; lower it to at most {high}."
        )


# Checks that relate several keys, run after the per-key CHECKS (so each value is well-typed).
CROSS_CHECKS: list[Callable[[DictConfig], None]] = [
    _check_num_classes,
    _check_epochs,
    _check_batch_split,
    _check_cuda_graphs,
    _check_accelerator_present,
    _check_logger_packages,
    _check_monitors,
]


def without_hydra(cfg: DictConfig) -> DictConfig:
    """`cfg` as Hydra hands it to a task: without the `hydra` node.

    A config composed with `compose(..., return_hydra_config=True)`, as lightning-hydra-template's
    tests compose theirs, keeps that node, and in a single run its multirun-only values
    (`hydra.job.num` in `hydra.sweep.subdir`) are missing: resolving the whole config would fail.
    """
    if "hydra" not in cfg:
        return cfg
    task = cfg.copy()
    with open_dict(task):
        del task["hydra"]
    return task


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (`-m` or a sweep config)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def validate_config(cfg: DictConfig, registry: bool = True) -> None:
    """Raise ConfigError for the first missing or invalid value, before any data or model work.

    `registry=False` skips the checks against the model registry (and its torch import).
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required value(s): {', '.join(missing)}; set them on the command line, "
            f"e.g. {missing[0]}=..."
        )
    for key, (ok, expected) in (CHECKS | (REGISTRY_CHECKS if registry else {})).items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if not ok(value):
            hint = expected() if callable(expected) else expected
            raise ConfigError(f"{key}={value!r} is invalid: expected {hint}.")
    for check in CROSS_CHECKS:
        check(cfg)
