"""The layers of docs/ARCHITECTURE.md hold: import-linter's contracts pass, and the config of one
`train(cfg)` call walks down the layers instead of bouncing between modules."""

from __future__ import annotations

import configparser
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from conftest import ROOT, RUN_ENV, compose_train
from omegaconf import DictConfig, ListConfig

# The budget issue 17 set for one train(cfg): climbs back to a higher layer, and re-entries into
# a module the route had left.
MAX_CLIMBS, MAX_RETURNS = 3, 4


def layers() -> list[list[str]]:
    """The layers contract of .importlinter, top first, each a list of packages."""
    ini = configparser.ConfigParser()
    ini.read(ROOT / ".importlinter")
    rows = ini["importlinter:contract:layers"]["layers"].strip().splitlines()
    return [[name.strip() for name in row.split("|")] for row in rows]


def layer_of(module: str) -> int:
    for index, row in enumerate(layers()):
        if any(module == p or module.startswith(p + ".") for p in row):
            return index
    raise AssertionError(f"{module} is in no layer of .importlinter")


@dataclass
class Entry:
    caller: str
    callee: str
    function: str


# The bottom layer's helpers (errors: the wording of refusals, and Hydra's instantiate with its
# refusals in one line) serve every layer as Hydra itself does; the tracer sees through them as
# it sees through Hydra, so that a node handed to Hydra by way of them is no visit.
PASS_THROUGH = ("gunn_exp.errors",)


def _module(frame: FrameType | None) -> str:
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def _ours(module: str) -> bool:
    return module.startswith("gunn_exp") and module not in PASS_THROUGH


def config_route(work: Any) -> list[Entry]:
    """Every call, while `work()` runs, from one gunn_exp module into another that passes the
    config (a DictConfig/ListConfig node) as an argument: the route the config takes."""
    entries: list[Entry] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        module = _module(frame)
        if event != "call" or not _ours(module):
            return
        code = frame.f_code
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if not any(isinstance(frame.f_locals.get(n), DictConfig | ListConfig) for n in names):
            return
        caller = frame.f_back  # the nearest gunn_exp frame: Hydra, Lightning in between
        while caller is not None and not _ours(_module(caller)):
            caller = caller.f_back
        if caller is not None and _module(caller) != module:
            entries.append(Entry(_module(caller), module, code.co_name))

    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return entries


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.is_file():
        pytest.skip("import-linter is not installed (the dev extra)")
    proc = subprocess.run(
        [str(lint)], cwd=ROOT, env=RUN_ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
def test_the_config_walks_down_the_layers(tmp_path: Path, resume: bool) -> None:
    from gunn_exp.training.train import train

    overrides = ("experiment=digits", "debug=tiny", "trainer.max_epochs=1", "print_config=false")
    run_dir = tmp_path / "run"
    if resume:
        train(compose_train(*overrides, output_dir=run_dir))
    cfg = compose_train(*overrides, *(["ckpt_path=last"] if resume else []), output_dir=run_dir)
    route = config_route(lambda: train(cfg))
    seen = {"gunn_exp.training.train"}
    climbs, returns = [], []
    for entry in route:
        if layer_of(entry.callee) < layer_of(entry.caller):
            climbs.append(entry)
        if entry.callee in seen:
            returns.append(entry)
        seen.add(entry.callee)
    shown = "\n".join(f"{e.caller} -> {e.callee}.{e.function}" for e in route)
    assert len(climbs) <= MAX_CLIMBS and len(returns) <= MAX_RETURNS, shown
    # The tracer sees the route: the config checks, and the resume checks when resuming.
    assert any(e.callee == "gunn_exp.config" for e in route), shown
    assert any(e.callee == "gunn_exp.training.resume" for e in route) == resume, shown
