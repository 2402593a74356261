#!/usr/bin/env bash
# The Writing-Zero reproduction in the small writing world on 2 CPU cores: data and initial
# writer, scalar RM, GenRM (cold start + GRPO), both writers. Each stage resumes when rerun.
# Prints each stage's wall time; results under results/writing_zero/.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
start=$(date +%s)
for stage in "writing_world world_cpu" "train_reward_model rm_cpu" "train_genrm genrm_cpu" \
             "train_writer writer_cpu"; do
  set -- $stage
  begin=$(date +%s)
  "$python" "experiments/$1.py" --config "configs/writing_zero/$2.yaml"
  echo "stage $1: $(( $(date +%s) - begin )) s (total $(( $(date +%s) - start )) s)"
done
