"""One-command check of the GPU path: `python -m gunn_exp.analysis.gpu_check [--quick]` (`make
gpu-check`).

Runs offline on a fresh node (no dataset on disk) and writes `benchmarks/gpu_<device>.md` and
`.json` (after every part): the machine, the torch/CUDA versions, the command, and five parts:

1. exactness: every GUNN layer implementation against `reference` on the device, in float32
   (TF32 off, tight tolerance) and under bf16 autocast with channels_last (to bf16 rounding):
   outputs, input and parameter gradients, BatchNorm running statistics; the default
   implementation also compiled as `compile=true` runs it (its segment functions);
2. throughput: GUNN-15 training steps at CIFAR shape (bf16 autocast, channels_last, fused SGD) for
   `reference` / `keep_convs` / `recompute` x eager / compile / compile + CUDA graphs, with the
   CIFAR ResNet-18 yardstick in the same process; models interleaved, medians; img/s, ratio to the
   yardstick, peak `max_memory_allocated`, compile time, kernels per step (profiler);
3. one GUNN-18 training step at 224x224, bf16, batch 64: img/s and peak memory;
4. end to end through `train.py` (trainer=gpu, a generated CIFAR-10 folder read by the real loader,
   data.on_device=true, compile=true, 2 short epochs), a resume to a third epoch, `eval.py`;
5. packing: 1, 2, 4, 8 GUNN-15 runs (processes) training at once on the device, images/s summed,
   in the compile mode part 2 found fastest for the default implementation.

Each part is guarded: a failure is recorded in the report and the next part still runs. Each part
has a time budget (the whole fits in about 8 minutes on one H100/H200); what a budget cuts is
reported as skipped. Without CUDA the same command runs a tiny CPU version of every part (small
shapes, gunn_mini, compile with the `aot_eager` backend), so the script is exercised by the tests;
its numbers say nothing about a GPU.

The parts are built from the measurement toolkit of `gunn_exp.analysis` (`harness`, `kernels`,
`memory`, `machine`, `tables`); `run.main` runs them, `plan` sizes them, `report` writes them.
"""
