#!/usr/bin/env bash
# The GPU checks in one run, one JSON file (issue 19): `nnunetv2_recokd benchmark` of every distillation trainer at
# unet6_128 and hippocampus (step time ratio to the floor, peak GPU memory), the ensemble trainers with 1, 2 and
# 5 teachers, one training step of each low-dose trainer under CUDA autocast, and a short real nnUNetv2_train of
# nnUNetTrainerReCoKD with torch.compile left to nnU-Net. Each part runs in a child process with its own time
# limit; the limits add up to 430 s (sized for 8 minutes on one H100 with the machine's start, Python start-up
# included). What the parts do and what the JSON holds: nnunetv2_recokd/evaluation/gpu_check.py.
#
#   bash examples/gpu_check.sh [OUT.json] [gpu-check options]     # default $OUT/gpu_check.json, else ./gpu_check.json
#   source .device/setup.sh && bash examples/gpu_check.sh $OUT/gpu_check.json      # on the GPU machine
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash examples/gpu_check.sh /tmp/gpu_check.json   # CPU rehearsal (tests)
#
# Environment: GPU_CHECK_DEVICE (cuda, the default, or cpu), GPU_CHECK_QUICK=1 (tiny plans, 1-2 steps),
# GPU_CHECK_BUDGET (seconds for all parts), PYTHON (default: python). nnU-Net's folders are the run's own, in a
# temporary folder: the nnUNet_* variables of the caller are not used. Exit status 0 when every part is ok.
set -euo pipefail

if [[ $# -ge 1 && "$1" != -* ]]; then
    json="$1"
    shift
else
    json="${OUT:+$OUT/gpu_check.json}"
    json="${json:-./gpu_check.json}"
fi
args=(--json "$json" --device "${GPU_CHECK_DEVICE:-cuda}")
if [[ "${GPU_CHECK_QUICK:-0}" != 0 ]]; then
    args+=(--quick)
fi
if [[ -n "${GPU_CHECK_BUDGET:-}" ]]; then
    args+=(--budget "$GPU_CHECK_BUDGET")
fi
exec "${PYTHON:-python}" -m nnunetv2_recokd.cli gpu-check "${args[@]}" "$@"
