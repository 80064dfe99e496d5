"""The run contract: what a run directory and a checkpoint contain, written and read in one place.

    <run>/config.yaml            the resolved config the run started with (never overwritten)
    <run>/config.resume-<N>.yaml the config of the N-th resume, when it differs (configs.py)
    <run>/.hydra/                Hydra's record of the latest accepted start (configs.py)
    <run>/run.lock               pid and host of the process writing the run (lock.py)
    <run>/checkpoints/best.ckpt  lowest val top-1 error; last.ckpt: every epoch and on a signal.
                                 Each describes itself: model, arguments, classes, preprocessing
                                 and config travel inside it (checkpoint.py)
    <run>/metrics.csv            one row per epoch (continues across resumes)
    <run>/curves.png             loss and error curves (curves.py)
    <run>/results.json           the numbers a finished run is judged by
    <run>/classes.json           class names, in output order
    <run>/preprocessing.json     how an image file becomes an input (preprocessing.py)
    <run>/wandb_id.txt           the wandb run a resume continues
    <run>/eval/<tag>/            eval.py outputs; <run>/export/: export.py outputs

The writer (`training/`) and the readers (`inference/`, `analysis/`) import this package; it
imports neither. `files` (names and atomic I/O) is re-exported here, the rest by module.
"""

from gunn_exp.rundir.files import (
    BEST,
    CHECKPOINTS,
    CKPT_SUFFIX,
    CLASSES,
    CONFIG,
    CURVES,
    EVAL,
    EXPORT,
    LAST,
    LOCK,
    METRICS,
    PREPROCESSING,
    RESULTS,
    RESUME_CONFIG,
    WANDB_ID,
    atomic_write,
    checkpoint_path,
    ckpt_name,
    find_run_dir,
    out_of_space,
    read_classes,
    read_metrics,
    read_results,
    writable_folder,
    write_classes,
    write_json,
    write_results,
)

__all__ = [
    "BEST",
    "CHECKPOINTS",
    "CKPT_SUFFIX",
    "CLASSES",
    "CONFIG",
    "CURVES",
    "EVAL",
    "EXPORT",
    "LAST",
    "LOCK",
    "METRICS",
    "PREPROCESSING",
    "RESULTS",
    "RESUME_CONFIG",
    "WANDB_ID",
    "atomic_write",
    "checkpoint_path",
    "ckpt_name",
    "find_run_dir",
    "out_of_space",
    "read_classes",
    "read_metrics",
    "read_results",
    "writable_folder",
    "write_classes",
    "write_json",
    "write_results",
]
