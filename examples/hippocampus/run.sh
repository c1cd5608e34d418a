#!/usr/bin/env bash
# Real-data protocol on the Medical Segmentation Decathlon Hippocampus set (Dataset004, 208 cases):
# the teacher trained on fold 0 (../shared/teachers), the plain student controls and the distilled students,
# all with the SAME schedule and fold, evaluated on fold 0's validation cases with nnU-Net's own evaluation,
# then compared with `nnunetv2_recokd report`.
#
#   bash examples/hippocampus/run.sh                       # GPU, every trainer, 20 epochs x 250 iterations
#   DEVICE=cpu EPOCHS=3 ITERS=100 TRAINERS="nnUNetTrainerStudent nnUNetTrainerReCoKD" bash examples/hippocampus/run.sh
#
# Environment: WORK (output tree, default ./hippocampus_work), SHARED (folder holding data/ and teachers/,
# default ../shared beside the repository), DEVICE (cuda|cpu), EPOCHS, ITERS, VAL_ITERS, SEED (an integer seeds
# every trainer the same way; default: unseeded, as nnU-Net), TRAINERS, NP (processes for preprocessing).
#
# ENSEMBLE=1 (a GPU job): also train the teacher's folds 1-4 (nnUNetTrainerTeacher, TEACHER_EPOCHS x 250
# iterations, default 40 as the shared fold-0 teacher) and distil all five folds into one student with each of
# ENSEMBLE_TRAINERS (default nnUNetTrainerReCoKD_ensemble nnUNetTrainerLogitKD_ensemble). Their fold-0 validation is
# optimistic (folds 1-4 were trained on it); the report marks it so.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SHARED=${SHARED:-$(cd "$here/../../../shared" && pwd)}
WORK=${WORK:-$PWD/hippocampus_work}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-20}
ITERS=${ITERS:-250}
VAL_ITERS=${VAL_ITERS:-50}
SEED=${SEED:-null}
NP=${NP:-2}
ENSEMBLE=${ENSEMBLE:-0}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-40}
ENSEMBLE_TRAINERS=${ENSEMBLE_TRAINERS:-"nnUNetTrainerReCoKD_ensemble nnUNetTrainerLogitKD_ensemble"}
TRAINERS=${TRAINERS:-"nnUNetTrainerStudent nnUNetTrainerLogitKD nnUNetTrainerReCoKD nnUNetTrainerReCoKDGraph nnUNetTrainerStudent_w8 nnUNetTrainerReCoKD_w8"}
DATASET=Dataset004_Hippocampus

export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results/$DATASET"
[ -e "$nnUNet_raw/$DATASET" ] || ln -s "$SHARED/data/$DATASET" "$nnUNet_raw/$DATASET"
if [ "$DEVICE" = cpu ]; then
  export nnUNet_def_n_proc=${nnUNet_def_n_proc:-1} nnUNet_compile=f nnUNet_npp=0 nnUNet_nps=0
fi

echo "== plan and preprocess"
[ -f "$nnUNet_preprocessed/$DATASET/nnUNetPlans.json" ] || \
  nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres -np "$NP" > "$WORK/plan.log" 2>&1

# the teacher at nnU-Net's conventional location, where the students look for it (a copy: its validation
# summary is written into it below)
teacher=$nnUNet_results/$DATASET/nnUNetTrainer__nnUNetPlans__3d_fullres
[ -d "$teacher" ] || cp -r "$SHARED/teachers/$DATASET/nnUNetTrainer__nnUNetPlans__3d_fullres" "$teacher"

cat > "$WORK/schedule.json" <<JSON
{"num_epochs": $EPOCHS, "num_iterations_per_epoch": $ITERS, "num_val_iterations_per_epoch": $VAL_ITERS, "seed": $SEED}
JSON
for tr in $TRAINERS; do
  if [ -f "$nnUNet_results/$DATASET/${tr}__nnUNetPlans__3d_fullres/fold_0/validation/summary.json" ]; then
    echo "== $tr already trained and validated"; continue
  fi
  echo "== train $tr ($EPOCHS x $ITERS iterations, $DEVICE)"
  if [ "$DEVICE" = cpu ]; then
    nnUNet_n_proc_DA=0 RECOKD_CONFIG="$WORK/schedule.json" nnUNetv2_train 4 3d_fullres 0 -tr "$tr" -device cpu \
      > "$WORK/train_$tr.log" 2>&1
  else
    RECOKD_CONFIG="$WORK/schedule.json" nnUNetv2_train 4 3d_fullres 0 -tr "$tr" > "$WORK/train_$tr.log" 2>&1
  fi
done

device_args=() da_env=()
if [ "$DEVICE" = cpu ]; then device_args=(-device cpu); da_env=(nnUNet_n_proc_DA=0); fi
if [ "$ENSEMBLE" = 1 ]; then
  folds_teacher=$nnUNet_results/$DATASET/nnUNetTrainerTeacher__nnUNetPlans__3d_fullres
  cat > "$WORK/teacher_schedule.json" <<JSON
{"num_epochs": $TEACHER_EPOCHS, "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50, "seed": $SEED}
JSON
  for fold in 1 2 3 4; do
    [ -f "$folds_teacher/fold_$fold/checkpoint_final.pth" ] && continue
    echo "== teacher fold $fold ($TEACHER_EPOCHS x 250 iterations, $DEVICE)"
    env "${da_env[@]}" RECOKD_CONFIG="$WORK/teacher_schedule.json" nnUNetv2_train 4 3d_fullres "$fold" -tr nnUNetTrainerTeacher \
      "${device_args[@]}" > "$WORK/train_teacher_fold$fold.log" 2>&1
  done
  # the five fold teachers as a list: fold 0 is the shared teacher, folds 1-4 were trained above
  cat > "$WORK/ensemble.json" <<JSON
{"num_epochs": $EPOCHS, "num_iterations_per_epoch": $ITERS, "num_val_iterations_per_epoch": $VAL_ITERS, "seed": $SEED,
 "teacher": ["$teacher/fold_0", "$folds_teacher/fold_1", "$folds_teacher/fold_2", "$folds_teacher/fold_3",
             "$folds_teacher/fold_4"]}
JSON
  for tr in $ENSEMBLE_TRAINERS; do
    if [ -f "$nnUNet_results/$DATASET/${tr}__nnUNetPlans__3d_fullres/fold_0/validation/summary.json" ]; then
      echo "== $tr already trained and validated"; continue
    fi
    echo "== train $tr from 5 fold teachers ($EPOCHS x $ITERS iterations, $DEVICE)"
    env "${da_env[@]}" RECOKD_CONFIG="$WORK/ensemble.json" nnUNetv2_train 4 3d_fullres 0 -tr "$tr" "${device_args[@]}" \
      > "$WORK/train_$tr.log" 2>&1
  done
fi

echo "== teacher on the same fold-0 validation cases"
if [ ! -f "$teacher/fold_0/validation/summary.json" ]; then
  val_images=$WORK/teacher_val_images
  mkdir -p "$val_images"
  python - "$nnUNet_preprocessed/$DATASET/splits_final.json" "$nnUNet_raw/$DATASET/imagesTr" "$val_images" <<'PY'
import json, os, sys
splits, images, out = sys.argv[1:]
for case in json.load(open(splits))[0]["val"]:
    src = os.path.join(images, f"{case}_0000.nii.gz")
    dst = os.path.join(out, os.path.basename(src))
    if not os.path.exists(dst):
        os.symlink(src, dst)
PY
  [ -f "$teacher/fold_0/validation/$(ls "$val_images" | tail -n 1 | sed s/_0000//)" ] || \
  nnUNetv2_predict -i "$val_images" -o "$teacher/fold_0/validation" -d 4 -c 3d_fullres -f 0 -device "$DEVICE" \
    > "$WORK/predict_teacher.log" 2>&1
  nnUNetv2_evaluate_folder "$nnUNet_raw/$DATASET/labelsTr" "$teacher/fold_0/validation" \
    -djfile "$nnUNet_preprocessed/$DATASET/dataset.json" -pfile "$nnUNet_preprocessed/$DATASET/nnUNetPlans.json" --chill \
    > "$WORK/evaluate_teacher.log" 2>&1
fi

echo "== report"
nnunetv2_recokd report 4 -c 3d_fullres -f 0 --device "$DEVICE" --out "$WORK/report"
