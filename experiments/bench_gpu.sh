#!/usr/bin/env bash
# Every GPU benchmark in one run, each with its own time limit, output under $1 (default
# results/bench_gpu): the sampler against transformers (static cache + torch.compile), the decode
# kernels, DeepConf's workload, the compiled decode loop's memory on this backend (unpaged and
# paged), the policy step against PyTorch, and a 20-iteration GRPO run against TRL (needs trl;
# bench_rl_step.py's own default is 50 steps).
#
#     bash experiments/bench_gpu.sh [OUT_DIR]
set -uo pipefail
out=${1:-results/bench_gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import jax, flax, optax, transformers, torch; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__, 'torch', \
torch.__version__, jax.devices())"
timeout "${SAMPLER_SECONDS:-420}" python3 experiments/bench_sampler.py --size gpu --batches 256 \
    --parts kernels deepconf generate memory paged --kernels auto portable \
    --out "$out/sampler.json" \
    2>&1 | grep -v "^Loading weights" | tee "$out/sampler.log"
timeout "${STEP_SECONDS:-150}" python3 experiments/bench_train_step.py --size gpu \
    --out "$out/train_step.json" 2>&1 | grep -v "^Loading weights" | tee "$out/train_step.log"
timeout "${RL_SECONDS:-240}" python3 experiments/bench_rl_step.py --size gpu --steps 20 \
    --out "$out/rl_step.json" 2>&1 | grep -v "^Loading weights" | tee "$out/rl_step.log"
