"""What every root script (train.py, eval.py, classify.py, ...) shares: where the project is,
the config resolvers, log output, and ending with the exit status of `errors.exit_code`.

Imports nothing heavy, so a script can validate its config before torch and Lightning load.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gunn_exp.config import in_multirun
from gunn_exp.errors import ConfigError, Interrupted, JobFailed, exit_code, one_line

# Warnings that libraries raise about each other, which no user of ours can act on: Lightning
# 2.6 uses a pytree class that torch 2.14 deprecated, and says so at every loop start.
LIBRARY_NOISE = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)

# lightning-hydra-template's train.yaml keys that this suite spells otherwise: (theirs, ours,
# why). The template nests the optimizer, the scheduler and the network inside its `model`
# config (the LightningModule's); here each is its own group and `model` is the network.
TEMPLATE_KEYS = (
    ("model.optimizer", "optimizer", "the optimizer is its own group: optimizer=sgd|adamw"),
    ("model.scheduler", "scheduler", "the scheduler is its own group: scheduler=multistep|cosine"),
    ("model.net", "model", "the model group is the network itself: model=gunn15, model.drop_rate"),
    ("model.compile", "compile", "torch.compile is a top-level switch"),
)


def prepare(script: str, log_info: bool = False) -> None:
    """Set PROJECT_ROOT to the script's folder (conf/paths uses it), register resolvers and
    silence LIBRARY_NOISE.

    `log_info`: argparse tools show gunn_exp's INFO lines (Hydra scripts configure logging
    through conf/hydra instead).
    """
    os.environ.setdefault("PROJECT_ROOT", str(Path(script).resolve().parent))
    for message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message, FutureWarning)
    from gunn_exp.training.schedules import register_resolvers

    register_resolvers()
    if log_info:
        logging.basicConfig(format="%(message)s")  # warnings from libraries, INFO from ours
        logging.getLogger("gunn_exp").setLevel(logging.INFO)


@contextmanager
def exits_on_error(sweep_job: bool = False) -> Iterator[None]:
    """Turn a user-facing error into one line on stderr and its exit status (errors.py).

    `sweep_job`: this is a Hydra task function. In a multirun, a failed job ends as a failed job
    (`JobFailed`, its line) rather than ending the process, so the sweep's other jobs still run
    and Hydra's sweeper reports the failure after them (exit status 1); a signal (Ctrl-C,
    SIGTERM) still stops the whole sweep.
    """
    try:
        yield
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise
        print(one_line(err), file=sys.stderr)
        if sweep_job and not isinstance(err, Interrupted) and in_multirun():
            raise JobFailed(one_line(err)) from None
        sys.exit(code)


def refuse_template_keys(overrides: list[str]) -> None:
    """train.py's command line, before Hydra composes it: a key spelled as in
    lightning-hydra-template (TEMPLATE_KEYS) gets one line naming this suite's key, where Hydra
    would say only that the key is not in the config."""
    with exits_on_error():
        for override in overrides:
            key = override.partition("=")[0].lstrip("+~")
            for theirs, ours, why in TEMPLATE_KEYS:
                if key == theirs or key.startswith(theirs + "."):
                    raise ConfigError(
                        f"{key}: here it is {ours + key[len(theirs) :]} ({why}; "
                        f"lightning-hydra-template nests it under model)."
                    )


def run(main: Callable[[], int]) -> int:
    """The exit status of an argparse tool: what `main()` returns, or its error's (errors.py)."""
    with exits_on_error():
        return main()
