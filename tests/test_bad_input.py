"""Bad input stops before any training step with exit code 2 and one line naming the value or
file and the fix, no traceback (issue 12 §2).

Each case is one row. CASES run in-process: `make` builds the input under tmp_path and calls the
check that must refuse it, which raises one of the exit-2 errors (the entry points map them to
exit 2, tested once per route in ENTRY_CASES, which start the real scripts).
"""

from __future__ import annotations

import importlib.util
import pickle
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, RUN_ENV, compose_train, run_entry, run_tool, write_cifar
from hydra import compose, initialize_config_dir
from PIL import Image

from gunn_exp.config import validate_config
from gunn_exp.data import CIFARDataModule, DigitsDataModule, ImageNetDataModule
from gunn_exp.errors import BAD_INPUT, instantiate_config
from gunn_exp.inference.run import list_images, load_run, resolve_device
from gunn_exp.rundir.preprocessing import Preprocessing
from gunn_exp.training.checkpoints import ResumeAsInPlace
from gunn_exp.training.schedules import register_resolvers
from gunn_exp.training.train import build_module, build_network, build_trainer

register_resolvers()

EXIT_2 = BAD_INPUT  # what the entry points exit 2 on
Make = Callable[[Path], object]


# --- builders: each returns a `make(tmp_path)` that runs the check on freshly generated input ---


def config(*overrides: str) -> Make:
    """validate_config on what `train.py <overrides>` would compose."""
    return lambda tmp: validate_config(compose_train(*overrides))


def data(*overrides: str) -> Make:
    """The data module `train.py experiment=digits <overrides>` would build."""
    return lambda tmp: instantiate_config(
        compose_train("experiment=digits", *overrides).data, "data"
    )


def model(*overrides: str) -> Make:
    """The network `train.py experiment=digits <overrides>` would build."""
    return lambda tmp: build_network(compose_train("experiment=digits", *overrides))


def module(*overrides: str) -> Make:
    """The LightningModule `train.py experiment=digits <overrides>` would build."""

    def make(tmp: Path) -> object:
        cfg = compose_train("experiment=digits", *overrides)
        return build_module(cfg, build_network(cfg))

    return make


def trainer(*overrides: str) -> Make:
    """The Trainer `train.py experiment=digits <overrides>` would build."""

    def make(tmp: Path) -> object:
        cfg = compose_train("experiment=digits", f"paths.output_dir={tmp}", *overrides)
        return build_trainer(cfg, tmp, False, ResumeAsInPlace())

    return make


def eval_config(*overrides: str) -> Make:
    def make(tmp: Path) -> None:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            # paths.output_dir set: its default reads the HydraConfig that only eval.py sets.
            args = ["run_dir=unused", f"paths.output_dir={tmp}", *overrides]
            validate_config(compose("eval", overrides=args))

    return make


def damage(path: Path, how: str) -> None:
    """truncate: keep the first half; random: same size of random bytes; delete."""
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))
    else:
        raise ValueError(how)


def same_error(*steps: Callable[[], object]) -> None:
    """Each step (train.py's check, eval.py's prepare_data/setup) must refuse the input with the
    same message; then that error is raised. Returns if none refuses (a later step may)."""
    errors: list[Exception] = []
    for step in steps:
        try:
            step()
        except EXIT_2 as err:
            errors.append(err)
    if errors:
        messages = [str(err) for err in errors]
        assert len(errors) == len(steps) and len(set(messages)) == 1, messages
        raise errors[0]


def cifar(
    file: str = "",
    how: str = "",
    data_dir: str = "",
    verify: bool = False,
    name: str = "cifar10",
    num_classes: int | None = None,
    **content: object,
) -> Make:
    """CIFARDataModule check, prepare_data and setup on generated CIFAR files, one of them
    damaged; `content` replaces that file's pickle with a dict of the given keys instead."""

    def make(tmp: Path) -> None:
        write_cifar(tmp, name)
        folder = tmp / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
        if content:
            (folder / file).write_bytes(pickle.dumps(content))
        elif file:
            damage(folder / file, how)
        if data_dir == "file":
            (tmp / "a_file").write_text("not a folder")
        root = {"": tmp, "missing": tmp / "nothing", "file": tmp / "a_file"}[data_dir]
        dm = CIFARDataModule(
            name,
            data_dir=str(root),
            download=False,
            verify_checksums=verify,
            num_classes=num_classes or (10 if name == "cifar10" else 100),
        )
        same_error(dm.check, dm.prepare_data, dm.setup)

    return make


def write_jpeg(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def write_imagenet(root: Path, classes: tuple[str, ...] = ("n01", "n02"), per_class: int = 3):
    seed = 0
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                seed += 1
                write_jpeg(root / split / c / f"{k}.JPEG", seed)


def imagenet(
    file: str = "",
    how: str = "",
    mkdir: str = "",
    drop: str = "",
    data_dir: str = "",
    check_images: int | str = 200,
    workers: int = 0,
    num_classes: int = 2,
) -> Make:
    """ImageNetDataModule.prepare_data + setup (and one training batch when check_images=0, so
    the loader's own check is what must refuse) on a generated 2-class tree, damaged."""

    def make(tmp: Path) -> None:
        root = tmp / "imagenet"
        write_imagenet(root)
        if file:
            damage(root / file, how)
        if mkdir:
            (root / mkdir).mkdir(parents=True)
        if drop:
            shutil.rmtree(root / drop)
        if data_dir == "file":
            (tmp / "a_file").write_text("not a folder")
            root = tmp / "a_file" / "imagenet"
        dm = ImageNetDataModule(
            data_dir=str(root),
            num_classes=num_classes,
            image_size=16,
            batch_size=6,
            num_workers=workers,
            check_images=check_images,
        )
        same_error(dm.check, dm.prepare_data)
        dm.setup()
        try:
            next(iter(dm.train_dataloader()))
        except EXIT_2 as err:
            # Without the loader's frames its worker stops now; left to the garbage collector, in a
            # later test, the loader's shutdown waits 5 s for it.
            raise err.with_traceback(None) from None

    return make


def undescribed_checkpoint(path: Path) -> None:
    """A checkpoint written before checkpoints described their run: config.yaml says the model."""
    path.parent.mkdir()
    torch.save({"state_dict": {}}, path)


def run_dir_with_config(text: str, ckpt: str = "best") -> Make:
    """load_run(ckpt=`ckpt`) on a run directory whose config.yaml holds `text` (its checkpoint
    needs it)."""

    def make(tmp: Path) -> None:
        undescribed_checkpoint(tmp / "checkpoints" / "best.ckpt")
        (tmp / "config.yaml").write_text(text)
        load_run(tmp, ckpt)

    return make


def plain_weights(tmp: Path) -> None:
    """A bare state_dict (torch.save(model.state_dict())) given where a checkpoint belongs."""
    torch.save({"stem.0.weight": torch.zeros(2, 3, 3, 3)}, tmp / "weights.pt")
    load_run(tmp / "weights.pt")


def empty_image_folder(tmp: Path) -> None:
    (tmp / "photos").mkdir()
    (tmp / "photos" / "notes.txt").write_text("not an image")
    list_images([tmp / "photos"])


def case(
    name: str, make: Make, pattern: str, no_gpu: bool = False, needs_missing: str = ""
) -> object:
    """One row: `make` must raise an exit-2 error whose one-line message matches `pattern`
    (`no_gpu`: on a machine without CUDA; `needs_missing`: where that package is not installed)."""
    marks = [pytest.mark.skipif(torch.cuda.is_available(), reason="needs no GPU")] if no_gpu else []
    if needs_missing:
        installed = importlib.util.find_spec(needs_missing) is not None
        marks.append(pytest.mark.skipif(installed, reason=f"{needs_missing} is installed"))
    return pytest.param(make, pattern, id=name, marks=marks)


# (id, make, a regex the one-line message must match: the bad value or file, and the fix)
# fmt: off
CASES = [
    case("cifar_missing", cifar(data_dir="missing"), r"not in .*nothing.*Fix: download"),
    case("cifar_data_dir_is_a_file", cifar(data_dir="file"), r"a_file is a file, not a folder.*Fix: set paths.data_dir to"),
    case("cifar_truncated_batch", cifar("data_batch_3", "truncate"), r"data_batch_3 is corrupt.*download=true"),
    case("cifar_random_bytes_batch", cifar("test_batch", "random"), r"test_batch is corrupt.*download=true"),
    case("cifar_missing_meta", cifar("batches.meta", "delete"), r"batches\.meta is missing.*download=true"),
    case("cifar_meta_without_names", cifar("batches.meta", names=[]), r"batches\.meta is corrupt.*label_names"),
    case("cifar100_truncated_train", cifar("train", "truncate", name="cifar100"), r"cifar-100-python/train is corrupt.*cifar-100-python\.tar\.gz"),
    case("cifar100_meta_of_cifar10", cifar("meta", name="cifar100", label_names=["a"]), r"cifar-100-python/meta is corrupt.*no 'fine_label_names'"),
    case("cifar_num_classes_wrong", cifar(num_classes=5), r"cifar10 has 10 classes but data\.num_classes=5; set data\.num_classes=10"),
    case("cifar_md5_mismatch", cifar(verify=True), r"data_batch_1 is corrupt \(its md5.*download=true"),
    case("imagenet_missing", imagenet(data_dir="file"), r"a_file is a file, not a folder"),
    case("imagenet_truncated_jpeg", imagenet("train/n02/1.JPEG", "truncate"), r"n02/1\.JPEG cannot be decoded.*Fix"),
    case("imagenet_random_bytes_jpeg", imagenet("val/n01/0.JPEG", "random"), r"n01/0\.JPEG cannot be decoded"),
    case("imagenet_bad_jpeg_in_loader", imagenet("train/n01/2.JPEG", "truncate", check_images=0, workers=1), r"^\S*n01/2\.JPEG cannot be decoded.*Fix"),
    case("imagenet_num_classes_wrong", imagenet(num_classes=3), r"imagenet \(\S*imagenet\) has 2 classes but data\.num_classes=3; set data\.num_classes=2"),
    case("digits_num_classes_wrong", lambda tmp: DigitsDataModule(num_classes=7).check(), r"digits has 10 classes but data\.num_classes=7"),
    case("imagenet_empty_class", imagenet(mkdir="train/n03"), r"train/n03 has no image files.*Fix"),
    case("imagenet_class_not_in_val", imagenet(drop="val/n02"), r"class n02 is in \S*/train but not in \S*/val.*Fix"),
    case("imagenet_class_not_in_train", imagenet(drop="train/n01"), r"class n01 is in \S*/val but not in \S*/train"),
    case("check_images_invalid", config("data=imagenet", "data.check_images=some"), r"data\.check_images='some' is invalid: .* or all"),
    case("batch_not_divisible", config("experiment=digits", "trainer=ddp_cpu", "data.batch_size=63"), r"data\.batch_size=63 .*2 processes.*=62"),
    case("num_classes_too_small", config("experiment=digits", "model.num_classes=5"), r"model\.num_classes=5 .*data\.num_classes=10"),
    case("segments_not_dividing_width", model("model=custom_gunn", "model.segments=[7,25,30]"), r"^model: .*stage 1: width 240 is not divisible by segments 7; .*\(nearest: 4, 5, 6, 8\)"),
    case("segments_zero", model("model=custom_gunn", "model.segments=[20,0,30]"), r"stage 2: width 300 is not divisible by segments 0; .*nearest: 1, 2, 3, 4"),
    case("gunnify_nothing_to_convert", model("model=resnet_mini", "model.gunnify.segments=3"), r"^gunnify: no residual block of ResNetCifar could be converted"),
    case("model_unknown_option", model("+model.depth=3"), r"^model: .*unknown option\(s\) \['depth'\]; accepted: \[.*'segments'"),
    case("paper_model_fixes_segments", model("model=gunn15", "+model.segments=[4,5,6]"), r"^model: gunn15 fixes segments: .*model=custom_gunn"),
    case("optimizer_refuses_nesterov", module("optimizer.momentum=0"), r"^optimizer: Nesterov momentum requires a momentum.*Fix the optimizer\.\* values"),
    case("optimizer_unknown_option", module("+optimizer.betas=[0.9,0.99]"), r"^optimizer: SGD.__init__\(\) got an unexpected keyword argument 'betas'"),
    case("scheduler_gamma_not_a_number", config("experiment=digits", "scheduler=multistep", "scheduler.gamma=abc"), r"scheduler\.gamma='abc' is invalid: expected a positive number"),
    case("imagenet_step_period_0", config("experiment=digits", "scheduler=imagenet_step", "scheduler.lr_lambda.period=0"), r"scheduler\.lr_lambda\.period=0 is invalid"),
    case("trainer_precision", trainer("+trainer.precision=13"), r"^trainer: Precision 13 is invalid.*'bf16-mixed'.*Fix the trainer\.\* values"),
    case("trainer_strategy", trainer("+trainer.strategy=foo"), r"^trainer: You selected an invalid strategy name: `strategy='foo'`"),
    case("min_epochs_negative", config("experiment=digits", "trainer.min_epochs=-1"), r"trainer\.min_epochs=-1 is invalid: expected an integer >= 0"),
    case("min_epochs_over_max", config("experiment=digits", "trainer.min_epochs=20"), r"trainer\.min_epochs=20 is more than trainer\.max_epochs=15.*raise trainer\.max_epochs"),
    case("momentum_1", config("experiment=digits", "optimizer.momentum=1"), r"optimizer\.momentum=1 is invalid: expected a number in \[0, 1\)"),
    case("accumulate_grad_batches_0", config("experiment=digits", "+trainer.accumulate_grad_batches=0"), r"trainer\.accumulate_grad_batches=0 is invalid: expected a positive"),
    case("val_check_interval_0", config("experiment=digits", "+trainer.val_check_interval=0"), r"trainer\.val_check_interval=0 is invalid.*\(0, 1\]"),
    case("check_val_every_n_epoch_0", config("experiment=digits", "trainer.check_val_every_n_epoch=0"), r"check_val_every_n_epoch=0 is invalid.*or null"),
    case("gradient_clip_negative", config("experiment=digits", "+trainer.gradient_clip_val=-1"), r"gradient_clip_val=-1 is invalid: expected a number >= 0"),
    case("early_stopping_patience_negative", config("experiment=digits", "callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=-1"), r"early_stopping\.patience=-1 is invalid"),
    case("checkpoint_monitors_accuracy", config("experiment=digits", "callbacks.model_checkpoint.monitor=val/acc"), r"callbacks\.model_checkpoint\.monitor='val/acc' is never logged.*'val/err1'"),
    case("early_stopping_monitors_typo", config("experiment=digits", "callbacks=[default,early_stopping]", "callbacks.early_stopping.monitor=val_loss"), r"early_stopping\.monitor='val_loss' is never logged.*'val/loss'"),
    case("cosine_T_max_0", config("experiment=digits", "scheduler.T_max=0"), r"scheduler\.T_max=0 .*positive"),
    case("wandb_log_model", config("experiment=digits", "logger=wandb", "logger.wandb.log_model=best"), r"logger\.wandb\.log_model=.best. is invalid: expected true .*all.*false"),
    case("limit_train_batches_0", config("experiment=digits", "debug=tiny", "trainer.limit_train_batches=0"), r"limit_train_batches=0 .*train nothing"),
    case("limit_train_batches_0.0", config("experiment=digits", "+trainer.limit_train_batches=0.0"), r"limit_train_batches=0\.0"),
    case("switch_not_a_boolean", config("experiment=digits", "test=no"), r"^test='no' is invalid: expected true or false"),
    case("allow_config_change_off", config("experiment=digits", "allow_config_change=off"), r"^allow_config_change='off' is invalid: expected true or false"),
    case("download_no", config("data=cifar10", "data.download=no"), r"^data\.download='no' is invalid: expected true or false"),
    case("seed_past_numpy_range", config("experiment=digits", "seed=99999999999"), r"^seed=99999999999 is invalid: expected null or an integer in \[0, 2\*\*32\)"),
    case("split_seed_negative", config("experiment=digits", "data.split_seed=-1"), r"^data\.split_seed=-1 is invalid"),
    case("limit_val_batches_0", config("experiment=digits", "+trainer.limit_val_batches=0"), r"limit_val_batches=0 is invalid.*best\.ckpt.*check_val_every_n_epoch"),
    case("limit_test_batches_0", config("experiment=digits", "+trainer.limit_test_batches=0"), r"limit_test_batches=0 is invalid.*test=false"),
    case("max_steps_0", config("experiment=digits", "+trainer.max_steps=0"), r"max_steps=0 is invalid: expected -1"),
    case("validation_never_runs", config("experiment=digits", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=5"), r"check_val_every_n_epoch=5 is more than trainer\.max_epochs=2: .*never validate"),
    case("milestones_as_fractions", config("experiment=digits", "scheduler=multistep", "scheduler.milestones=[0.5,0.75]"), r"scheduler\.milestones=\[0\.5, 0\.75\] is invalid: expected whole epochs"),
    case("digits_train_fraction_too_small", data("data.train_fraction=0.001"), r"train_fraction=0\.001 give 1 training images; .*at least 10.*Fix the data"),
    case("digits_val_fraction_too_small", data("data.val_fraction=0.001"), r"val_fraction=0\.001.* give 2 validation images"),
    case("trainer_gpu", config("experiment=digits", "trainer=gpu"), r"accelerator=gpu: .*no CUDA GPU.*trainer=cpu", no_gpu=True),
    case("eval_trainer_gpu", eval_config("trainer=gpu"), r"accelerator=gpu: .*no CUDA GPU.*trainer=cpu", no_gpu=True),
    case("cuda_graphs_keep_convs", config("experiment=digits", "trainer=gpu", "compile=true", "compile_mode=reduce-overhead"), r"compile_mode=reduce-overhead with model\.impl=keep_convs fails on the GPU.*model\.impl=reference.*compile_mode=null"),
    case("cuda_graphs_default_impl", config("experiment=digits", "trainer.accelerator=gpu", "compile=true", "compile_mode=max-autotune"), r"compile_mode=max-autotune with model\.impl=recompute fails"),
    case("cuda_graphs_reference_passes", config("experiment=digits", "trainer=gpu", "compile=true", "compile_mode=reduce-overhead", "model.impl=reference"), r"accelerator=gpu: .*no CUDA GPU", no_gpu=True),
    case("trainer_mps", config("experiment=digits", "trainer=mps"), r"accelerator=mps: .*no Apple GPU.*trainer=cpu"),
    case("logger_comet_missing", config("experiment=digits", "logger=comet"), r"logger=comet needs the comet_ml package, .*pip install -e '\.\[comet\]'", needs_missing="comet_ml"),
    case("logger_aim_missing", config("experiment=digits", "logger=aim"), r"logger=aim needs the aim package, .*pip install -e '\.\[aim\]'", needs_missing="aim"),
    case("logger_neptune_retired", config("experiment=digits", "logger=neptune"), r"logger=neptune .*Neptune has shut down.*use logger=wandb"),
    case("classify_device_cuda", lambda tmp: resolve_device("cuda"), r"'cuda': .*no CUDA GPU; use cpu", no_gpu=True),
    case("classify_device_meta", lambda tmp: resolve_device("meta"), r"'meta': images are classified on cpu, cuda or mps"),
    case("eval_limit_batches_negative", eval_config("limit_batches=-1"), r"^limit_batches=-1 is invalid: expected null, a number of batches"),
    case("eval_ckpt_neither_name_nor_file", run_dir_with_config("model: {name: gunn_mini}\n", ckpt="middle"), r"^ckpt=middle: neither best, last nor a checkpoint file.*eval\.py: ckpt=<that>; .*--ckpt <that>"),
    case("corrupt_run_config", run_dir_with_config("model: {name: gunn_mini\n  bad: [\n"), r"config\.yaml is not valid YAML .*Fix: restore"),
    case("run_config_not_a_run", run_dir_with_config("- a\n- list\n"), r"config\.yaml has no model\.name.*Fix"),
    case("plain_weights_as_checkpoint", plain_weights, r"weights\.pt has no 'state_dict'.*plain weights.*pretrained_cfg_overlay=dict\(file="),
    case("empty_image_folder", empty_image_folder, r"photos: the folder holds no image files"),
]
# fmt: on


@pytest.mark.parametrize(("make", "pattern"), CASES)
def test_bad_input_is_refused_in_one_line(make: Make, pattern: str, tmp_path: Path) -> None:
    with pytest.raises(EXIT_2) as caught:
        make(tmp_path)
    message = str(caught.value)
    assert "\n" not in message, message
    assert re.search(pattern, message), message
    chain: list[BaseException] = []  # what errors.exit_code and rundir.out_of_space walk
    err: BaseException | None = caught.value
    while err is not None and len(chain) < 20:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert err is None, f"the error's cause/context chain loops: {chain[:4]}"


# --- the real entry points: each route from a bad input to exit 2 + one line, once ---


def entry_train(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda tmp: [
        f"hydra.run.dir={tmp / 'run'}",
        "print_config=false",
        "debug=tiny",
        *(o.format(tmp=tmp) for o in overrides),
    ]


def entry_eval_corrupt_config(tmp: Path) -> list[str]:
    undescribed_checkpoint(tmp / "checkpoints" / "best.ckpt")
    (tmp / "config.yaml").write_text("model: {name: [\n")
    return [f"run_dir={tmp}"]


def entry_empty_folder(*extra: str) -> Callable[[Path], list[str]]:
    def args(tmp: Path) -> list[str]:
        (tmp / "photos").mkdir()
        return [str(tmp / "no_run"), str(tmp / "photos"), *extra]

    return args


def imagenet_tree(tmp: Path) -> Path:
    write_imagenet(tmp / "imagenet")
    damage(tmp / "imagenet" / "train" / "n01" / "1.JPEG", "truncate")
    return tmp / "imagenet"


# (id, script, args(tmp_path), the line's prefix, a regex the line must match)
# fmt: off
ENTRY_CASES = [
    ("train_ddp_missing_cifar", "train.py", entry_train("data=cifar10", "model=gunn_mini", "paths.data_dir={tmp}/nothing", "data.download=false", "trainer=ddp_cpu"), "error:", r"not in \S*nothing/cifar-10-batches-py .*Fix"),
    ("train_limit_train_batches_0", "train.py", entry_train("experiment=digits", "trainer.limit_train_batches=0"), "error:", r"limit_train_batches=0 "),
    ("train_val_check_interval_past_the_epoch", "train.py", entry_train("experiment=digits", "+trainer.val_check_interval=1000"), "error:", r"^error: trainer\.val_check_interval=1000 is more than the \d+ training batches of an epoch: use at most"),
    ("train_template_optimizer_key", "train.py", entry_train("experiment=digits", "model.optimizer.lr=0.01"), "error:", r"^error: model\.optimizer\.lr: here it is optimizer\.lr \(the optimizer is its own group"),
    ("train_template_net_key", "train.py", entry_train("experiment=digits", "+model.net.drop_rate=0.1"), "error:", r"^error: model\.net\.drop_rate: here it is model\.drop_rate "),
    ("train_bad_jpeg_in_loader", "train.py", lambda tmp: [*entry_train("data=imagenet", "model=gunn_mini", "data.num_classes=2", "data.image_size=16", "data.batch_size=6", "data.check_images=0", "data.num_workers=1")(tmp), f"data.data_dir={imagenet_tree(tmp)}"], "error:", r"error: \S*n01/1\.JPEG cannot be decoded.*Fix"),
    ("train_segments_not_dividing_width", "train.py", entry_train("experiment=digits", "model=custom_gunn", "model.segments=[2,3,5]", "model.widths=[32,48,64]"), "error:", r"^error: model: .*stage 3: width 64 is not divisible by segments 5; .*nearest: 1, 2, 4, 8\)"),
    ("train_data_refuses_fractions", "train.py", entry_train("experiment=digits", "data.val_fraction=2"), "error:", r"^error: data\.val_fraction=2 and data\.test_fraction=0\.2 must be in \(0, 1\).*Fix the data\.\* values"),
    ("eval_corrupt_run_config", "eval.py", entry_eval_corrupt_config, "error:", r"config\.yaml is not valid YAML"),
    ("export_negative_atol", "export.py", lambda tmp: ["no_run", "--atol", "-1"], "error:", r"^error: --atol -1\.0: a logit difference >= 0"),
    ("classify_empty_folder", "classify.py", entry_empty_folder(), "error:", r"photos: the folder holds no image files"),
    ("features_empty_folder", "features.py", entry_empty_folder("-o", "f.npy"), "error:", r"photos: the folder holds no image files"),
]
# fmt: on


@pytest.mark.parametrize(
    ("script", "args", "prefix", "pattern"),
    [c[1:] for c in ENTRY_CASES],
    ids=[c[0] for c in ENTRY_CASES],
)
def test_entry_point_exits_2_with_one_line(
    script: str, args: Callable[[Path], list[str]], prefix: str, pattern: str, tmp_path: Path
) -> None:
    proc = run_entry(script, *args(tmp_path), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # no training step


# --- the tools' other inputs: output folders, a results.json, --top-k ------------------------


def bad_output_path(kind: str, tmp: Path, read_only: Path) -> Path:
    """An output folder that cannot be written: read-only, or below a file."""
    if kind == "read_only":
        return read_only / "out"
    (tmp / "a_file").write_text("not a folder")
    return tmp / "a_file" / "out"


def one_error_line(code: int, stderr: str) -> str:
    assert code == 2, stderr[-2000:]
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in stderr
    return line


@pytest.mark.parametrize("kind", ["read_only", "parent_is_a_file"])
def test_export_and_features_refuse_an_output_they_cannot_write(
    kind: str, digits_run: tuple[str, Path], tmp_path: Path, read_only_folder: Path
) -> None:
    run_dir, out = digits_run[1], bad_output_path(kind, tmp_path, read_only_folder)
    code, _, stderr = run_tool("export.py", str(run_dir), "--out", str(out))
    assert f"--out {out}: cannot write there" in one_error_line(code, stderr)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    code, _, stderr = run_tool("features.py", str(run_dir), str(image), "-o", str(out / "f.npy"))
    assert f"--output {out}: cannot write there" in one_error_line(code, stderr)


def test_features_refuse_an_output_that_is_a_folder(
    digits_run: tuple[str, Path], tmp_path: Path
) -> None:
    output = tmp_path / "f.npy"
    output.mkdir()
    code, _, stderr = run_tool("features.py", str(digits_run[1]), str(tmp_path), "-o", str(output))
    assert f"--output {output} is a folder" in one_error_line(code, stderr)


def test_report_names_a_corrupt_results_file(tmp_path: Path) -> None:
    results = tmp_path / "run" / "results.json"
    results.parent.mkdir()
    results.write_text('{"model": "gunn_mini", "data": "dig')  # a copy cut short
    code, _, stderr = run_tool("report.py", str(tmp_path))
    assert f"{results} is not valid JSON" in one_error_line(code, stderr)


def test_classify_refuses_top_k_below_one(digits_run: tuple[str, Path], tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "img.png")
    for flag in ("--top-k", "--top"):
        code, stdout, stderr = run_tool("classify.py", str(digits_run[1]), str(tmp_path), flag, "0")
        assert "--top-k 0: show at least one class" in one_error_line(code, stderr)
        assert stdout == ""


# --- 16-bit images (classify.py, features.py): read as the 8-bit picture they widen ---


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grey HxW or RGB HxWx3), written by hand: Pillow cannot write 16-bit RGB."""
    height, width = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("colour", "shape"), [("L", (12, 12)), ("RGB", (12, 12)), ("RGB", (12, 12, 3))]
)
def test_16bit_png_gives_the_8bit_input(
    colour: str, shape: tuple[int, ...], tmp_path: Path
) -> None:
    eight = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "8.png")
    write_png16(tmp_path / "16.png", eight.astype(np.uint16) * 257)  # the same picture, 16 bits
    pre = Preprocessing("test", colour, 8, 8, (0.5,) * len(colour), (0.25,) * len(colour), 3)
    x8, x16 = pre.load(tmp_path / "8.png"), pre.load(tmp_path / "16.png")
    assert torch.equal(x8, x16)  # identical inputs: identical top-1 with any model
    if len(shape) == 2:  # grey: what Pillow's own convert() gave before (clipped to white)
        with Image.open(tmp_path / "16.png") as img:
            assert not torch.equal(pre(img), x8)


def test_float_images_are_refused_by_name(tmp_path: Path) -> None:
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(tmp_path / "f.tiff")
    pre = Preprocessing("test", "RGB", 8, 8, (0.5,) * 3, (0.25,) * 3, 3)
    with pytest.raises(ValueError, match=r"f\.tiff: 'F' pixels .*save it as"):
        pre.load(tmp_path / "f.tiff")


def test_wandb_without_a_login_stops_in_one_line_naming_the_ways_on(tmp_path: Path) -> None:
    """logger=wandb, online, in a process with no terminal and no API key (a batch job): wandb
    raises from inside the first log call; the run stops before training in one line."""
    env = {k: v for k, v in RUN_ENV.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path), "NETRC": str(tmp_path / "n")}
    proc = run_entry("train.py", *entry_train("experiment=digits", "logger=wandb")(tmp_path),
                     check=False, env=env)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "No API key" in line and "wandb login" in line and "WANDB_MODE=offline" in line
    assert not list(tmp_path.rglob("metrics.csv"))  # stopped before the first epoch
