#!/usr/bin/env bash
# The demo protocol on the embedded synthetic dataset (organs with small lesions), nothing to download:
# teacher, plain student control and ReCo-KD student trained with nnU-Net's own commands, held-out cases
# predicted and evaluated, table.md / table.json / figure.png written to $OUT.
#   bash examples/synthetic/run.sh                 # CPU: about 6 minutes on 2 cores
#   DEVICE=cuda bash examples/synthetic/run.sh
set -euo pipefail
OUT=${OUT:-$PWD/recokd_demo}
DEVICE=${DEVICE:-cpu}
nnunetv2_recokd demo --out "$OUT" --device "$DEVICE" "$@"
