#!/usr/bin/env bash
# Missing inputs (REACT-KD's setting, issue #12) on a synthetic two-channel dataset, with nnU-Net's own commands:
# channel "main" carries most of the signal, channel "weak" the same anatomy at a third of the contrast under
# more noise (nnunetv2_recokd/synthetic.py). A two-channel teacher teaches
#   - one-channel students (main only, weak only), each against the same student trained alone;
#   - two-channel students with and without modality dropout, evaluated with one channel blank (an all-zero
#     scan in its place, as a user with a missing scan would pass it).
# Everything is evaluated on held-out cases (imagesTs/labelsTs) with nnUNetv2_evaluate_simple; the table goes to
# $WORK/table.md. One seed, short schedules: a smoke-sized experiment, read its numbers as such.
#
#   bash examples/missing_inputs/run.sh                 # CPU, about 20 minutes on 2 cores
#   DEVICE=cuda EPOCHS=10 ITERS=50 bash examples/missing_inputs/run.sh
#
# Environment: WORK (default ./missing_inputs_work), DEVICE (cpu|cuda), TEACHER_EPOCHS, EPOCHS, ITERS, SEED,
# NUM_TRAIN, NUM_TEST.
set -euo pipefail
WORK=${WORK:-$PWD/missing_inputs_work}
DEVICE=${DEVICE:-cpu}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-5}
EPOCHS=${EPOCHS:-4}
ITERS=${ITERS:-25}
SEED=${SEED:-0}
NUM_TRAIN=${NUM_TRAIN:-10}
NUM_TEST=${NUM_TEST:-6}
ID=994
DATASET=Dataset994_MissingInputs
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results
export nnUNet_compile=f PYTHONUNBUFFERED=1
unset RECOKD_TEACHER RECOKD_CONFIG
if [ "$DEVICE" = cpu ]; then export nnUNet_def_n_proc=1 nnUNet_npp=0 nnUNet_nps=0; fi
da() { if [ "$DEVICE" = cpu ]; then echo 0; else echo "${nnUNet_n_proc_DA:-}"; fi; }

echo "== data, plan and preprocess"
[ -d "$nnUNet_raw/$DATASET" ] || python -c "
from nnunetv2_recokd.synthetic import write_dataset
write_dataset('$nnUNet_raw', $ID, 'MissingInputs', num_train=$NUM_TRAIN, num_test=$NUM_TEST, size=48,
              lesion_radius=0.15, seed=$SEED, channels=2)"
[ -f "$nnUNet_preprocessed/$DATASET/nnUNetPlans.json" ] || \
  nnUNetv2_plan_and_preprocess -d $ID -c 3d_fullres -np 1 > "$WORK/plan.log" 2>&1

train() {  # name trainer results-root json-settings
  local name=$1 trainer=$2 root=$3 settings=$4
  local folder=$root/$DATASET/${trainer}__nnUNetPlans__3d_fullres
  if [ -f "$folder/fold_0/checkpoint_final.pth" ]; then echo "== $name: trained"; return; fi
  echo "== train $name ($trainer)"
  echo "$settings" > "$WORK/config_$name.json"
  nnUNet_results=$root nnUNet_n_proc_DA=$(da) RECOKD_CONFIG="$WORK/config_$name.json" \
    nnUNetv2_train $ID 3d_fullres 0 -tr "$trainer" -device "$DEVICE" > "$WORK/train_$name.log" 2>&1
}
schedule="\"num_epochs\": $EPOCHS, \"num_iterations_per_epoch\": $ITERS, \"num_val_iterations_per_epoch\": 2, \"seed\": $SEED"
teacher=$nnUNet_results/$DATASET/nnUNetTrainerTeacher__nnUNetPlans__3d_fullres
train teacher nnUNetTrainerTeacher "$nnUNet_results" \
  "{\"num_epochs\": $TEACHER_EPOCHS, \"num_iterations_per_epoch\": $ITERS, \"num_val_iterations_per_epoch\": 2, \"seed\": $SEED}"
kd="\"teacher\": \"$teacher\""
train student_main nnUNetTrainerStudent "$WORK/r_main" "{$schedule, \"student_channels\": [\"main\"]}"
train recokd_main nnUNetTrainerReCoKD "$WORK/r_main" "{$schedule, $kd, \"student_channels\": [\"main\"]}"
train student_weak nnUNetTrainerStudent "$WORK/r_weak" "{$schedule, \"student_channels\": [\"weak\"]}"
train recokd_weak nnUNetTrainerReCoKD "$WORK/r_weak" "{$schedule, $kd, \"student_channels\": [\"weak\"]}"
train recokd_both nnUNetTrainerReCoKD "$WORK/r_both" "{$schedule, $kd}"
train recokd_dropout nnUNetTrainerReCoKD_modalityDropout "$WORK/r_both" "{$schedule, $kd}"
train student_dropout nnUNetTrainerStudent_modalityDropout "$WORK/r_both" "{$schedule}"

echo "== held-out inputs: both channels, one blank"
python - <<PY
import os
import numpy as np
import SimpleITK as sitk
src = "$nnUNet_raw/$DATASET/imagesTs"
for blank in ("main", "weak"):
    out = f"$WORK/inputs_blank_{blank}"
    os.makedirs(out, exist_ok=True)
    for f in sorted(os.listdir(src)):
        target = os.path.join(out, f)
        if os.path.exists(target):
            continue
        channel = "main" if f.endswith("_0000.nii.gz") else "weak"
        if channel != blank:
            os.symlink(os.path.join(src, f), target)
            continue
        image = sitk.ReadImage(os.path.join(src, f))
        zeros = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
        zeros.CopyInformation(image)
        sitk.WriteImage(zeros, target)
PY

evaluate() {  # label root trainer input-folder
  local label=$1 root=$2 trainer=$3 input=$4
  local out=$WORK/pred_$(echo "$label" | tr -c 'A-Za-z0-9\n-' '_')
  if [ ! -f "$out/summary.json" ]; then
    nnUNet_results=$root nnUNetv2_predict -i "$input" -o "$out" -d $ID -tr "$trainer" -c 3d_fullres -f 0 \
      -device "$DEVICE" --disable_tta -npp 0 -nps 0 > "$WORK/predict_$label.log" 2>&1
    nnUNetv2_evaluate_simple "$nnUNet_raw/$DATASET/labelsTs" "$out" -l 1 2 > "$WORK/evaluate_$label.log" 2>&1
  fi
  printf '%s\t%s\n' "$label" "$out/summary.json" >> "$WORK/evaluated.txt"
}
rm -f "$WORK/evaluated.txt"
ts=$nnUNet_raw/$DATASET/imagesTs
nnunetv2_recokd student-inputs -i "$ts" -o "$WORK/inputs_main_only" \
  -m "$WORK/r_main/$DATASET/nnUNetTrainerStudent__nnUNetPlans__3d_fullres" -f 0
nnunetv2_recokd student-inputs -i "$ts" -o "$WORK/inputs_weak_only" \
  -m "$WORK/r_weak/$DATASET/nnUNetTrainerStudent__nnUNetPlans__3d_fullres" -f 0
evaluate "teacher|both" "$nnUNet_results" nnUNetTrainerTeacher "$ts"
evaluate "teacher|main blank" "$nnUNet_results" nnUNetTrainerTeacher "$WORK/inputs_blank_main"
evaluate "teacher|weak blank" "$nnUNet_results" nnUNetTrainerTeacher "$WORK/inputs_blank_weak"
evaluate "student main-only|main" "$WORK/r_main" nnUNetTrainerStudent "$WORK/inputs_main_only"
evaluate "ReCo-KD main-only|main" "$WORK/r_main" nnUNetTrainerReCoKD "$WORK/inputs_main_only"
evaluate "student weak-only|weak" "$WORK/r_weak" nnUNetTrainerStudent "$WORK/inputs_weak_only"
evaluate "ReCo-KD weak-only|weak" "$WORK/r_weak" nnUNetTrainerReCoKD "$WORK/inputs_weak_only"
for t in "ReCo-KD two-channel:nnUNetTrainerReCoKD" "ReCo-KD + dropout:nnUNetTrainerReCoKD_modalityDropout" \
         "student + dropout:nnUNetTrainerStudent_modalityDropout"; do
  label=${t%%:*} trainer=${t##*:}
  evaluate "$label|both" "$WORK/r_both" "$trainer" "$ts"
  evaluate "$label|main blank" "$WORK/r_both" "$trainer" "$WORK/inputs_blank_main"
  evaluate "$label|weak blank" "$WORK/r_both" "$trainer" "$WORK/inputs_blank_weak"
done

python - <<PY
import json
rows = [line.rstrip("\n").split("\t") for line in open("$WORK/evaluated.txt")]
lines = ["| model | input | Dice organ | Dice lesion |", "|---|---|---|---|"]
table = []
for label, path in rows:
    model, given = label.split("|")
    dice = json.load(open(path))["mean"]
    table.append({"model": model, "input": given, "dice_organ": dice["1"]["Dice"], "dice_lesion": dice["2"]["Dice"]})
    lines.append(f"| {model} | {given} | {dice['1']['Dice']:.3f} | {dice['2']['Dice']:.3f} |")
text = "\n".join(lines)
open("$WORK/table.md", "w").write(text + "\n")
json.dump({"teacher_epochs": $TEACHER_EPOCHS, "epochs": $EPOCHS, "iterations": $ITERS, "seed": $SEED,
           "num_train": $NUM_TRAIN, "num_test": $NUM_TEST, "device": "$DEVICE", "rows": table},
          open("$WORK/table.json", "w"), indent=1)
print(text)
PY
