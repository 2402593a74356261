#!/usr/bin/env bash
# The papers' sizes compiled for TPU and GPU targets on any machine (no accelerator needed):
# DeepConf's decode loop for Qwen3-8B with 32k-token traces on a TPU v5e-8 and an H200, and
# the policy step of Writing-Zero's GenRM base (Qwen3-32B) on a TPU v5p-64 slice. Each
# variant writes results/compile_for/<target>-<model>-<variant>.json; the table is in
# docs/benchmarks.md. About 17 minutes on 2 cores (the TPU compiler runs on one thread).
#   bash experiments/compile_paper_sizes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/compile_for
run() {  # target variant args...
  local target=$1 variant=$2; shift 2
  python experiments/compile_for.py --target "$target" --out "$out/$target-$variant.json" "$@"
}
deepconf="--model qwen3-8b --jobs decode --prompts 1 --max-prompt-tokens 1024 --max-new-tokens 32768"
# H200: 16 slots of 32k tokens (the config's), 64 unpaged, 64 over a pool of 4,096 pages
run h200-1 qwen3-8b-n16 $deepconf --group-size 16
run h200-1 qwen3-8b-n64 $deepconf --group-size 64
run h200-1 qwen3-8b-n64-paged $deepconf --group-size 64 --kv-pages 4096
# TPU v5e-8 (15.75 GiB a chip): weights replicated or split, float or int8 caches
run tpu-v5e-8 qwen3-8b-n16 $deepconf --group-size 16
run tpu-v5e-8 qwen3-8b-n16-fsdp $deepconf --group-size 16 --decode-split fsdp
run tpu-v5e-8 qwen3-8b-n32-fsdp $deepconf --group-size 32 --decode-split fsdp
run tpu-v5e-8 qwen3-8b-n32-fsdp-int8 $deepconf --group-size 32 --decode-split fsdp --int8-cache
run tpu-v5e-8 qwen3-8b-n8-fsdp $deepconf --group-size 8 --decode-split fsdp
run tpu-v5e-8 qwen3-8b-n8-fsdp-int8 $deepconf --group-size 8 --decode-split fsdp --int8-cache
run tpu-v5e-8 qwen3-8b-n16-fsdp-int8 $deepconf --group-size 16 --decode-split fsdp --int8-cache
# TPU v5p-64 (32 devices): the Qwen3-32B policy step, 32 rows x 2,048 tokens, fsdp 8 x tensor 4
run tpu-v5p-64 qwen3-32b-train --model qwen3-32b --jobs train --rows 32 --width 2048 --tensor 4
