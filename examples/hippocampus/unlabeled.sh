#!/usr/bin/env bash
# Does the teacher pay through unlabeled scans? The Hippocampus protocol of issue #20, every row from one script.
#
# The shared fold-0 teacher (../shared/teachers, trained on fold 0's 166 training cases), width-1/4 students, one
# fixed budget per student (EPOCHS x ITERS iterations, default 15 x 100), all scored the same way: nnUNetv2_predict
# (mirroring on, as nnU-Net's validation) on held-out cases no model trained on, nnUNetv2_evaluate_folder, mean
# foreground Dice.
#
#   a   control, k labelled cases (k drawn by seed 0 from fold 0's training cases)      -> Dataset104 (k + 42 val)
#   b   ReCo-KD, the same k labelled cases, no unlabeled ones                            -> Dataset104
#       b_logitkd: logit KD (nnUNetTrainerLogitKD) on the same k labelled cases: does logit KD fail without
#       teacher labels too, as c_logitkd did? (yes: 0.3418, seed 0; issue #20)
#   c   the same k + the other fold-0 training cases unlabeled, labelled by the teacher -> Dataset204:
#       c_student (the control trainer on teacher labels: pseudo-labels alone), c_recokd, c_logitkd
#   c_agree  c_student's recipe on Dataset214: Dataset204's teacher labels with nnU-Net's ignore label where the
#       teacher's 8 mirrorings are not unanimous (add-unlabeled --min-agreement 1; issue #20, item 4)
#   d   zero labels: all 166 fold-0 training cases unlabeled (fold all of Dataset304)
#   e   control with all 166 labelled cases (Dataset004 fold 0)
#   u   the pair on scans the teacher never saw: k labelled, half of fold 0's validation cases unlabeled, scored on
#       the other half (Dataset105 / Dataset205): u_a (control), u_c (c_student's recipe)
#   w8  width 1/8: w8_a (control on Dataset104) and w8_c (control trainer, width 1/8, on Dataset204)
#       (15 x 100 is too short for width 1/8 to learn both structures; EPOCHS=30 ROWS="w8_a w8_c" PARALLEL=1: 87 min)
#   K=5 ROWS="a c_student" PARALLEL=1: the pair with 5 labelled cases (Dataset605 / Dataset705, rows a_k5 and
#       c_student_k5; seed 0: 0.8115 and 0.8430, +0.031; issue #20)
# held-out: fold 0's 42 validation cases (rows a-e, w8), 21 of them (rows u).
# A dataset preprocessed here is marked by $nnUNet_preprocessed/<name>/.recokd_3d_fullres_done (not inside the
# configuration folder: nnU-Net infers the dataset format from every file ending there).
# NB the teacher was trained on fold 0's training cases, so its labels of them (rows c, d) are better than its labels
# of new scans would be: rows u measure that case.
#
#   ROWS="a c_student" SEEDS="0 1 2" bash examples/hippocampus/unlabeled.sh
#
# Environment: WORK (default ./hippocampus_unlabeled), SHARED (default ../shared beside the repository), ROWS
# (default: every row), SEEDS (default 0), K (20; another k: its own datasets, rows <row>_k<K>), EPOCHS (15), ITERS
# (100), DEVICE (cpu|cuda; default cpu),
# THREADS (torch threads per training on the cpu, the trainers' cpu_threads setting; default: 1 with PARALLEL=1, else
# nnU-Net's choice, every core), PARALLEL (1: the rows of a seed train side by side, THREADS each: two
# control trainings took 170-190 s per epoch each, one alone with 2 threads ~140 s), PLAN (1: print the settings, stop).
# Before cpu_threads existed, nnUNetv2_train gave every training all cores whatever OMP_NUM_THREADS said: two side by
# side took 568 s per 100-iteration epoch of the control. Alone with 2 threads the control takes about 140 s per epoch
# (seed 2) and ReCo-KD about 1.6x that, so the headline pair one after the other takes about 90 minutes of training.
# The pair side by side, ROWS="a c_student" PARALLEL=1 (c_student, the control trainer on the teacher's labels, is
# within 0.001 of ReCo-KD's (c) on seed 0 and half its cost), timed end to end from an empty WORK on the 2-core
# machine with nothing else running: 52 min 10 s (Dataset104, the teacher labelling the 146 scans at ~1.9 s each and
# Dataset204: 5.2 min; the two trainings side by side, ~172 s per epoch each: 44.7 min; predicting and scoring: 2.9
# min), under the issue's 75 (docs/results/unlabeled_hippocampus_headline_pair_timed.md). ReCo-KD side by side takes
# ~330 s per epoch (one thread); logit KD ~340 s alone with 2 threads (the teacher's whole forward on every batch).
# Results: $WORK/table.md and table.json (one line per row and seed), and each model's summary.json.
# A budget other than 15 x 100 names its rows <row>_<EPOCHS>x<ITERS> (results, logs, scores): EPOCHS=30 ROWS=w8_a
# trains and scores w8_a_30x100 beside w8_a instead of resuming or re-scoring the 15-epoch model. LR (the initial
# learning rate, default nnU-Net's 0.01) likewise names them <row>_lr<LR>: LR=0.023 ROWS=c_student -> c_student_lr0.023.
# SET (trainer settings, name=value separated by spaces, e.g. SET="logit_temperature=1") goes into every row's config
# and names the rows <row>+<name>=<value>: SET="logit_temperature=1" ROWS=b_logitkd -> b_logitkd+logit_temperature=1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SHARED=${SHARED:-$(cd "$here/../../../shared" && pwd)}
WORK=${WORK:-$PWD/hippocampus_unlabeled}
ROWS=${ROWS:-"a b b_logitkd c_student c_recokd c_logitkd c_agree d e u_a u_c w8_a w8_c"}
SEEDS=${SEEDS:-0}
K=${K:-20}
EPOCHS=${EPOCHS:-15}
ITERS=${ITERS:-100}
DEVICE=${DEVICE:-cpu}
PARALLEL=${PARALLEL:-0}
LR=${LR:-0.01}
budget=""  # the suffix of rows run at another k, budget, learning rate or settings than the protocol's
# the datasets of k labelled cases: Dataset104 (k labelled + the held-out cases) and Dataset204 (those + the other
# fold-0 training cases labelled by the teacher) for the protocol's k = 20; Dataset<600+k> and Dataset<700+k> for
# another k, whose rows are named <row>_k<k>. Rows d and e do not depend on k, c_agree and u exist for k = 20 only.
labelled_id=104 labelled_name=HippoK20 derived_id=204 derived_name=HippoK20Unlabeled
if [ "$K" != 20 ]; then
  if [[ ! "$K" =~ ^[1-9][0-9]?$ ]]; then
    echo "K: '$K' is not a number of labelled cases from 1 to 99 (the protocol's is 20)" >&2; exit 2
  fi
  k_rows="a b b_logitkd c_student c_recokd c_logitkd w8_a w8_c"
  for r in $ROWS; do
    if [[ " $k_rows " != *" $r "* ]]; then
      echo "K=$K: row $r runs with the protocol's k = 20 only; rows that take another k: $k_rows" \
           "(e.g. K=$K ROWS=\"a c_student\")" >&2; exit 2
    fi
  done
  labelled_id=$((600 + K)) labelled_name=HippoK$K derived_id=$((700 + K)) derived_name=HippoK${K}Unlabeled
  budget=_k$K
fi
labelled=Dataset${labelled_id}_$labelled_name
if [ "$EPOCHS" != 15 ] || [ "$ITERS" != 100 ]; then budget=${budget}_${EPOCHS}x$ITERS; fi
row_settings=""
if [ "$LR" != 0.01 ]; then budget=${budget}_lr$LR; row_settings=", \"initial_lr\": $LR"; fi
for pair in ${SET:-}; do  # trainer settings of these rows: name=value (a JSON value: a number, true, false)
  if [[ ! "$pair" =~ ^[a-z][a-z0-9_]*=[^=+\ ]+$ ]]; then
    echo "SET: '$pair' is not name=value (e.g. SET=\"logit_temperature=1 logit_weight=0.25\")" >&2; exit 2
  fi
  budget=$budget+$pair; row_settings="$row_settings, \"${pair%%=*}\": ${pair#*=}"
done
if [ "$PARALLEL" = 1 ]; then THREADS=${THREADS:-1}; else THREADS=${THREADS:-}; fi  # empty: nnU-Net's choice
SOURCE=$SHARED/data/Dataset004_Hippocampus
TEACHER=$SHARED/teachers/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres

if [ "${PLAN:-0}" = 1 ]; then  # PLAN=1: print what would run and stop (writes nothing)
  echo "rows: $ROWS | seeds: $SEEDS | k $K | $EPOCHS x $ITERS iterations | initial lr $LR | device $DEVICE |"\
       "parallel $PARALLEL | torch threads per training: ${THREADS:-every core} | work: $WORK"
  [ -z "$budget" ] || echo "rows are saved as <row>$budget (not the protocol's k = 20, 15 x 100 iterations at"\
                           "learning rate 0.01)"
  [ "$K" = 20 ] || echo "datasets: $labelled (k = $K labelled + the held-out cases)," \
                        "Dataset${derived_id}_$derived_name (those + the other fold-0 training cases, teacher-labelled)"
  [ -z "${SET:-}" ] || echo "settings added to every row's config: {${row_settings#, }}"
  exit 0
fi
export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results" "$WORK/logs" "$WORK/scores"
train_env=()
cpu_threads=""  # nnUNetv2_train -device cpu ignores OMP_NUM_THREADS for torch: the trainers' cpu_threads setting does it
if [ "$DEVICE" = cpu ]; then
  export nnUNet_def_n_proc=1 nnUNet_compile=f nnUNet_npp=0 nnUNet_nps=0
  train_env=(nnUNet_n_proc_DA=0)
  if [ -n "$THREADS" ]; then
    cpu_threads=", \"cpu_threads\": $THREADS"
    train_env+=(OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS")
  fi
fi

# a dataset of raw links preprocessed with the teacher's plans (no re-planning: the teacher's spacing and patch)
few_label_dataset() {  # id name unlabeled-folder mode
  local id=$1 name=Dataset$1_$2 unlabeled=$3 mode=$4
  [ -f "$nnUNet_preprocessed/$name/.recokd_3d_fullres_done" ] && return
  python "$here/few_labels.py" "$SOURCE" "$nnUNet_raw" "$nnUNet_preprocessed" "$name" "$unlabeled" --k "$K" \
    --seed 0 --unlabeled-cases "$mode"
  python - "$TEACHER/plans.json" "$nnUNet_preprocessed/$name" "$name" <<'PY'
import json, shutil, sys
plans, out, name = sys.argv[1:]
p = json.load(open(plans)); p["dataset_name"] = name
json.dump(p, open(f"{out}/nnUNetPlans.json", "w"), indent=1)
shutil.copy(f"{out}/../../raw/{name}/dataset.json", f"{out}/dataset.json")
PY
  nnUNetv2_extract_fingerprint -d "$id" -np 1 > "$WORK/logs/fingerprint_$id.log" 2>&1
  nnUNetv2_preprocess -d "$id" -c 3d_fullres -np 2 > "$WORK/logs/preprocess_$id.log" 2>&1
  touch "$nnUNet_preprocessed/$name/.recokd_3d_fullres_done"
}

held_out_images() {  # dataset-name -> a folder with its fold-0 validation images (links)
  local name=$1 out=$WORK/heldout_$1
  if [ ! -d "$out" ]; then
    mkdir -p "$out"
    python - "$nnUNet_preprocessed/$name/splits_final.json" "$SOURCE/imagesTr" "$out" <<'PY'
import json, os, sys
splits, images, out = sys.argv[1:]
for case in json.load(open(splits))[0]["val"]:
    os.symlink(os.path.join(images, f"{case}_0000.nii.gz"), os.path.join(out, f"{case}_0000.nii.gz"))
PY
  fi
  echo "$out"
}

# train one student (skipped when done), predict the held-out cases, evaluate: $WORK/scores/<row>_s<seed>.json
student() {  # row seed dataset-id fold trainer held-out-dataset-name [extra settings json]
  local row=$1$budget seed=$2 id=$3 fold=$4 tr=$5 heldout=$6 extra=${7:-}
  local results=$WORK/results_$row/s$seed
  local config=$WORK/config_${row}_s$seed.json
  # save_every 1: a run killed mid-way resumes from its last epoch (--c below) instead of starting again
  echo "{\"num_epochs\": $EPOCHS, \"num_iterations_per_epoch\": $ITERS, \"num_val_iterations_per_epoch\": 5,"\
       "\"save_every\": 1, \"seed\": $seed$row_settings$cpu_threads${extra:+, $extra}}" > "$config"
  local name; name=$(basename "$(ls -d "$nnUNet_raw"/Dataset"$(printf %03d "$id")"_*)")
  local model=$results/$name/${tr}__nnUNetPlans__3d_fullres
  if [ ! -f "$model/fold_$fold/checkpoint_final.pth" ]; then
    local resume=()
    [ -f "$model/fold_$fold/checkpoint_latest.pth" ] && resume=(--c)
    echo "== $row seed $seed: train $tr on $name fold $fold ($EPOCHS x $ITERS, $DEVICE)${resume:+, resumed}"
    env "${train_env[@]}" nnUNet_results="$results" RECOKD_CONFIG="$config" \
      nnUNetv2_train "$id" 3d_fullres "$fold" -tr "$tr" -device "$DEVICE" "${resume[@]}" \
      >> "$WORK/logs/${row}_s$seed.log" 2>&1
  fi
  local pred=$WORK/pred_${row}_s$seed
  if [ ! -f "$pred/summary.json" ]; then
    nnUNetv2_predict_from_modelfolder -i "$(held_out_images "$heldout")" -o "$pred" -m "$model" -f "$fold" \
      -device "$DEVICE" -npp 1 -nps 1 > "$WORK/logs/predict_${row}_s$seed.log" 2>&1
    nnUNetv2_evaluate_folder "$SOURCE/labelsTr" "$pred" --chill -djfile "$model/dataset.json" -pfile "$model/plans.json" \
      > "$WORK/logs/evaluate_${row}_s$seed.log" 2>&1
  fi
  python - "$pred/summary.json" "$model/fold_$fold" "$row" "$seed" "$tr" "$name" "$fold" "$EPOCHS" "$ITERS" "$LR" \
    > "$WORK/scores/${row}_s$seed.json" <<'PY'
import json, os, sys
summary, fold_dir, row, seed, trainer, dataset, fold, epochs, iterations, lr = sys.argv[1:]
s = json.load(open(summary))
cases = os.path.join(fold_dir, "recokd_training_cases.json")
print(json.dumps({"row": row, "seed": int(seed), "trainer": trainer, "dataset": dataset, "fold": fold,
                  "dice_mean": s["foreground_mean"]["Dice"],
                  "dice_per_class": {k: v["Dice"] for k, v in s["mean"].items()},
                  "held_out_cases": len(s["metric_per_case"]), "epochs": int(epochs), "iterations": int(iterations),
                  "initial_lr": float(lr),
                  "training_cases": json.load(open(cases)) if os.path.exists(cases) else None}))
PY
  echo "== $row seed $seed: $(python -c "import json,sys; print(round(json.load(open(sys.argv[1]))['dice_mean'], 4))" \
    "$WORK/scores/${row}_s$seed.json")"
}

derived() {  # id labelled-id unlabeled-folder name [add-unlabeled flags] (labelled-id empty: zero labels)
  local id=$1 labelled=$2 unlabeled=$3 name=$4 flags=("${@:5}")
  [ -d "$nnUNet_raw/Dataset${id}_$name" ] && [ -f "$nnUNet_preprocessed/Dataset${id}_$name/splits_final.json" ] \
    && return
  local d_args=()
  [ -n "$labelled" ] && d_args=(-d "$labelled")
  nnunetv2_recokd add-unlabeled -i "$unlabeled" -t "$TEACHER" "${d_args[@]}" --id "$id" --name "$name" \
    -device "$DEVICE" -np 2 --threads 2 "${flags[@]}" > "$WORK/logs/add_unlabeled_$id.log" 2>&1
}

wants() { [[ " $ROWS " == *" $1 "* ]]; }
row() {  # run one student row, in the background with PARALLEL=1 (the seed's loop waits for all of them)
  if [ "$PARALLEL" = 1 ]; then student "$@" & else student "$@"; fi
}

few_label_dataset "$labelled_id" "$labelled_name" "$WORK/unlabeled_k$K" train-rest
if wants c_student || wants c_recokd || wants c_logitkd || wants w8_c; then
  derived "$derived_id" "$labelled_id" "$WORK/unlabeled_k$K" "$derived_name"
fi
wants c_agree && derived 214 104 "$WORK/unlabeled_k20" HippoK20UnlabeledAgree --min-agreement 1
held_out_images "$labelled" > /dev/null  # made once, before rows run side by side
for seed in $SEEDS; do
  wants a && row a "$seed" "$labelled_id" 0 nnUNetTrainerStudent "$labelled"
  wants b && row b "$seed" "$labelled_id" 0 nnUNetTrainerReCoKD "$labelled" "\"teacher\": \"$TEACHER\""
  wants b_logitkd && row b_logitkd "$seed" "$labelled_id" 0 nnUNetTrainerLogitKD "$labelled" "\"teacher\": \"$TEACHER\""
  wants c_student && row c_student "$seed" "$derived_id" 0 nnUNetTrainerStudent "$labelled"
  wants c_recokd && row c_recokd "$seed" "$derived_id" 0 nnUNetTrainerReCoKD "$labelled"
  wants c_logitkd && row c_logitkd "$seed" "$derived_id" 0 nnUNetTrainerLogitKD "$labelled"
  wants c_agree && row c_agree "$seed" 214 0 nnUNetTrainerStudent Dataset104_HippoK20
  wants w8_a && row w8_a "$seed" "$labelled_id" 0 nnUNetTrainerStudent_w8 "$labelled"
  wants w8_c && row w8_c "$seed" "$derived_id" 0 nnUNetTrainerStudent_w8 "$labelled"
  if wants d; then
    # every fold-0 training case unlabeled; fold all trains on all of them; the student's fold "all" names no
    # teacher fold, so teacher_folds picks the teacher's fold 0
    mkdir -p "$WORK/unlabeled_all"
    python - "$SOURCE" "$WORK/unlabeled_all" <<'PY'
import json, os, sys
from nnunetv2.utilities.crossval_split import generate_crossval_split
source, out = sys.argv[1:]
cases = sorted(f[:-7] for f in os.listdir(os.path.join(source, "labelsTr")) if f.endswith(".nii.gz"))
for case in generate_crossval_split(cases, seed=12345, n_splits=5)[0]["train"]:
    target = os.path.join(out, f"{case}_0000.nii.gz")
    if not os.path.exists(target):
        os.symlink(os.path.join(source, "imagesTr", f"{case}_0000.nii.gz"), target)
PY
    derived 304 "" "$WORK/unlabeled_all" HippoAllUnlabeled
    student d "$seed" 304 all nnUNetTrainerStudent Dataset104_HippoK20
  fi
  if wants e; then
    if [ ! -f "$nnUNet_preprocessed/Dataset004_Hippocampus/.recokd_3d_fullres_done" ]; then
      [ -e "$nnUNet_raw/Dataset004_Hippocampus" ] || ln -s "$SOURCE" "$nnUNet_raw/Dataset004_Hippocampus"
      nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres -np 2 > "$WORK/logs/plan_004.log" 2>&1
      touch "$nnUNet_preprocessed/Dataset004_Hippocampus/.recokd_3d_fullres_done"
    fi
    student e "$seed" 4 0 nnUNetTrainerStudent Dataset104_HippoK20
  fi
  if wants u_a || wants u_c; then
    few_label_dataset 105 HippoK20Half "$WORK/unlabeled_valhalf" val-half
    wants u_c && derived 205 105 "$WORK/unlabeled_valhalf" HippoK20HalfUnlabeled
    held_out_images Dataset105_HippoK20Half > /dev/null
    wants u_a && row u_a "$seed" 105 0 nnUNetTrainerStudent Dataset105_HippoK20Half
    wants u_c && row u_c "$seed" 205 0 nnUNetTrainerStudent Dataset105_HippoK20Half
  fi
  wait
done

python - "$WORK/scores" "$WORK" <<'PY'
import json, statistics, sys
from pathlib import Path
scores, work = Path(sys.argv[1]), Path(sys.argv[2])
rows = [json.loads(p.read_text()) for p in sorted(scores.glob("*.json")) if p.stat().st_size]
json.dump(rows, open(work / "table.json", "w"), indent=1)
lines = ["| row | seed | trainer | dataset | fold | held-out cases | mean Dice | Dice per class |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    per = ", ".join(f"{k}: {v:.4f}" for k, v in r["dice_per_class"].items())
    lines.append(f"| {r['row']} | {r['seed']} | {r['trainer']} | {r['dataset']} | {r['fold']} | {r['held_out_cases']} "
                 f"| {r['dice_mean']:.4f} | {per} |")
(work / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
