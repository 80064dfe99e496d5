"""What is refused before a run starts: the config's values, the sweep's tags, and
`train`/`test`/`ckpt_path` combinations that would do nothing or overwrite a trained run. Each
refusal is one ConfigError naming the value and the fix."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from gunn_exp import rundir
from gunn_exp.config import in_multirun, validate_config
from gunn_exp.errors import ConfigError


def check_run(cfg: DictConfig) -> None:
    """Every pre-run refusal, in the order a user would fix them."""
    validate_config(cfg)
    require_tags(cfg)
    check_train_test(cfg)


def require_tags(cfg: DictConfig) -> None:
    """A multirun needs tags, lightning-hydra-template's `enforce_tags` rule: refused only when
    there are none at all (`tags=[]`, `tags=null`); the default `[dev]` runs, as the template's
    own sweep tests rely on. A single run without tags runs too (the template would prompt for
    them; a run must not wait on a terminal). Off with `extras.enforce_tags=false`."""
    if not cfg.extras.enforce_tags or not in_multirun() or cfg.get("tags"):
        return
    raise ConfigError(
        f"tags={cfg.get('tags')} in a multirun: name the sweep with tags, e.g. "
        f"tags=[lr_sweep,gunn15] (or keep the default tags=[dev]; an experiment config may set "
        f"them), or turn the check off with extras.enforce_tags=false."
    )


def check_train_test(cfg: DictConfig) -> None:
    """`train=false` tests a checkpoint: it needs one, needs `test=true`, and must not overwrite
    the results of a trained run."""
    if cfg.train:
        return
    if cfg.ckpt_path is None or not cfg.test:
        raise ConfigError(
            f"train=false needs a checkpoint to test and test=true: add ckpt_path=<file.ckpt> "
            f"(got ckpt_path={cfg.ckpt_path}, test={cfg.test}); or use eval.py ckpt_path=..."
        )
    results = Path(cfg.paths.output_dir) / rundir.RESULTS
    if results.is_file():
        raise ConfigError(
            f"train=false would overwrite {results} of a trained run; test into a new directory "
            f"(drop hydra.run.dir) or use eval.py ckpt_path={cfg.ckpt_path}."
        )


def refuse_a_second_run(output_dir: Path) -> None:
    """A fresh run into a directory holding another run's checkpoints would leave that run's
    best.ckpt in place (Lightning writes best-v1.ckpt beside it) under the new run's config and
    results, so eval.py, classify.py and export.py would quietly use the old weights."""
    found = [
        path.name
        for path in (
            rundir.checkpoint_path(output_dir, name) for name in (rundir.BEST, rundir.LAST)
        )
        if path.is_file()
    ]
    if found:
        raise ConfigError(
            f"{output_dir} already holds a run ({', '.join(found)} in {rundir.CHECKPOINTS}/); a "
            f"fresh run there would mix the two. Resume it with ckpt_path=last (or auto), or "
            f"train into a new directory (drop hydra.run.dir or give another)."
        )


def lightning_config_error(err: BaseException) -> ConfigError | None:
    """Values Lightning can check only once it knows the epoch's length (when fit starts): its
    ValueError, a traceback naming a key our configs spell otherwise, as one line; None for any
    other error."""
    found = re.search(r"`val_check_interval` \((\d+)\).*training batches \((\d+)\)", str(err))
    if not isinstance(err, ValueError) or found is None:
        return None
    value, batches = found.groups()
    return ConfigError(
        f"trainer.val_check_interval={value} is more than the {batches} training batches of "
        f"an epoch: use at most {batches}, a fraction of the epoch in (0, 1], or count "
        f"batches across epochs with trainer.check_val_every_n_epoch=null."
    )
