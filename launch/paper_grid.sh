#!/usr/bin/env bash
# The paper's benchmark grid as Ray jobs submitted from this checkout (see launch/README.md):
#   1. the teachers, one job per distinct teacher;
#   2. per config, in parallel: cpsc-ray's defaults (distill, SEEDS seeds) and an Optuna+ASHA search;
#      after the search, its finalize rerun and a PBT population seeded from it, then PBT's finalize;
#   3. the report over everything.
#
#   ADDRESS=http://127.0.0.1:8265 STORAGE=/shared/runs DATA=/shared/data TAG=paper1 launch/paper_grid.sh [CONFIG ...]
#
# CONFIG defaults to all six shipped CIFAR-10/100 and Tiny-ImageNet configs. Each job's output
# stays on the cluster: `cpsc-ray submit --logs ID`. A failed step stops its config's chain only;
# the script exits non-zero at the end if any step failed. Run it again with the same TAG after a
# failure, a lost head or an interrupted script: every step continues where it stopped (teachers
# already trained and finished runs are kept, interrupted ones resume from their newest checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."

ADDRESS=${ADDRESS:-http://127.0.0.1:8265}          # the job server (`ray dashboard launch/cluster.yaml`)
STORAGE=${STORAGE:?set STORAGE to an absolute path every node mounts (or an s3:// or gs:// URI)}
DATA=${DATA:?set DATA to the directory holding cifar-10-batches-py/, cifar-100-python/ and tiny-imagenet-200/}
TAG=${TAG:?set TAG, the grid's name: experiment names end in it; the same TAG again continues the grid}
SEEDS=${SEEDS:-3}                                  # distill seeds and finalize reruns
OPTUNA_SAMPLES=${OPTUNA_SAMPLES:-32}
POPULATION=${POPULATION:-8}                        # PBT trials
PERTURBATION_INTERVAL=${PERTURBATION_INTERVAL:-20} # epochs between PBT decisions
GPUS_PER_RUN=${GPUS_PER_RUN:-1}                    # DDP workers, one GPU each, per distill run and trial
MAX_CONCURRENT=${MAX_CONCURRENT:-}                 # Optuna trials at once (default: what the cluster holds)
DRIVER_RESOURCE=${DRIVER_RESOURCE:-}               # e.g. cpsc_driver: keep drivers on the nodes that carry it
TIMEOUT=${TIMEOUT:-1209600}                        # seconds a job may take (two weeks)
read -r -a EXTRA <<< "${EXTRA:-}"                  # overrides for every run, e.g. EXTRA="train.epochs=200"
CPSC_RAY=${CPSC_RAY:-cpsc-ray}

if (($#)); then CONFIGS=("$@"); else CONFIGS=(
  cifar10_resnet34_resnet18 cifar100_resnet34_resnet18 cifar100_vgg11_resnet18
  cifar100_wrn40_2_wrn16_2 cifar100_wrn40_2_wrn40_1 tiny_imagenet_resnet34_resnet18
); fi

job() {  # submit a cpsc-ray command and wait for it (riding out a dropped connection); fails unless it succeeded
  # A driver that only orchestrates stays on the nodes that carry DRIVER_RESOURCE; one that trains (a teacher's,
  # with --entrypoint-num-gpus) must go where the GPUs are.
  local driver=()
  [[ -n $DRIVER_RESOURCE && " $* " != *" --entrypoint-num-gpus "* ]] && driver=(--driver-resource "$DRIVER_RESOURCE")
  "$CPSC_RAY" submit --address "$ADDRESS" --wait --timeout "$TIMEOUT" "${driver[@]}" "$@" > /dev/null
}

data_root() { case "$1" in tiny_imagenet_*) echo "$DATA/tiny-imagenet-200" ;; *) echo "$DATA" ;; esac; }
optuna_space() { case "$1" in cifar10_*) echo cpsc_optuna_cifar10 ;; *) echo cpsc_optuna ;; esac; }
teacher_of() { local t=${1%_resnet18}; t=${t%_wrn16_2}; echo "${t%_wrn40_1}"; }  # <dataset>_<teacher>

failed=0
wait_all() { local pid; for pid in "$@"; do wait "$pid" || failed=1; done; }

# 1. Teachers train in the job's driver, so those jobs ask for a GPU. Configs that share a teacher
#    (the two wrn_40_2 ones) share its cache slot under CPSC_RAY_CACHE: train it once.
trained=" "
pids=()
for config in "${CONFIGS[@]}"; do
  teacher=$(teacher_of "$config")
  [[ $trained == *" $teacher "* ]] && continue
  trained+="$teacher "
  job --entrypoint-num-gpus 1 -- teacher --if-missing --config "$config" data.root="$(data_root "$config")" \
    "${EXTRA[@]}" &
  pids+=($!)
done
wait_all "${pids[@]}"
((failed == 0)) || { echo "a teacher failed: see cpsc-ray submit --logs ID (ray job list)" >&2; exit 1; }

tuning() {  # tune and finalize one config's search, then its PBT seeded from it
  local config=$1 root
  root=$(data_root "$config")
  local common=(--config "$config" --workers-per-trial "$GPUS_PER_RUN" --gpus-per-trial "$GPUS_PER_RUN"
                --max-failures 1 --max-restarts 2 ${DRIVER_RESOURCE:+--driver-resource "$DRIVER_RESOURCE"}
                --storage "$STORAGE" data.root="$root" "${EXTRA[@]}")
  local optuna=$config-optuna-$TAG pbt=$config-pbt-$TAG
  job -- tune --space "$(optuna_space "$config")" --search optuna --scheduler asha --num-samples "$OPTUNA_SAMPLES" \
    ${MAX_CONCURRENT:+--max-concurrent "$MAX_CONCURRENT"} --resume-or-start "$optuna" "${common[@]}" || return 1
  job -- finalize "$optuna" --resume-or-start --seeds "$SEEDS" --gpus-per-seed 1 --storage "$STORAGE" &
  local final=$!
  local status=0
  job -- tune --space cpsc_pbt --scheduler pbt --num-samples "$POPULATION" --seed-from "$optuna" \
    --perturbation-interval "$PERTURBATION_INTERVAL" --resume-or-start "$pbt" "${common[@]}" \
    && job -- finalize "$pbt" --resume-or-start --seeds "$SEEDS" --gpus-per-seed 1 --storage "$STORAGE" || status=1
  wait "$final" || status=1
  return "$status"
}

# 2. Per config: cpsc-ray's defaults over seeds, and the tuning chain, all in parallel.
pids=()
for config in "${CONFIGS[@]}"; do
  for ((seed = 0; seed < SEEDS; seed++)); do
    job -- distill --config "$config" --resume-or-start "$config-defaults-$TAG-s$seed" --workers "$GPUS_PER_RUN" \
      --gpus-per-worker 1 --max-restarts 2 --storage "$STORAGE" seed="$seed" data.root="$(data_root "$config")" \
      "${EXTRA[@]}" &
    pids+=($!)
  done
  tuning "$config" &
  pids+=($!)
done
wait_all "${pids[@]}"

# 3. The report: on the cluster when STORAGE is a shared path, here when it is a URI (needs credentials).
if [[ $STORAGE == *://* ]]; then
  "$CPSC_RAY" report "$STORAGE" -o "report-$TAG"
else
  job -- report "$STORAGE" -o "$STORAGE/report-$TAG" && echo "report: $STORAGE/report-$TAG/report.html"
fi
((failed == 0)) || { echo "some steps failed: ray job list / cpsc-ray submit --logs ID" >&2; exit 1; }
