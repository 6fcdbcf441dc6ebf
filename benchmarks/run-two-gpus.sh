#!/usr/bin/env bash
# One run on a host with two GPUs (issue 22, and the multi-GPU checks of issue 14), at most about
# 9 minutes in all (270 + 120 + 15 + 70 + 70 s of limits); each step has its own time limit and
# the next runs whatever the last one gave. Run from the repository root with PYTHONPATH (or an
# installed package) giving gguf_gpu_lab, torch, transformers >= 5.24 (the tensor-parallel path) and CuPy; results go to $OUT.
#
#   1. pytest -m gpu: every GPU test, the two-GPU ones included (loads over both GPUs, the copy
#      ceiling's child process for worlds 1 and 2), log in $OUT/pytest-gpu-two.log.
#   2. bench --tp, NCCL, worlds 1 and 2, the 8B Q4_K_M llama: per rank the bytes read against its
#      shards + the replicated tensors (target: within 1 %), load time and GB/s; the two ranks'
#      combined GB/s against the copy ceiling of both GPUs measured in the same run (target >= 0.9),
#      world 1 (one rank, the whole model) the reference. Writes tp-<date>-<gpus>.json.
#   3. bench --tp the same way on another architecture: a 1B qwen2 file (attention biases, 32/4
#      heads) written by gguf-gpu-lab synth.
#   4. bench --multi-gpu without the 70B file: pinned H2D alone and together, the copy ceiling, the
#      8B file on one GPU against both, the outputs compared bit for bit.
#
# Each step's exit status is in $OUT/steps.txt; its output in $OUT/<step>.log.

set -u
: "${OUT:?set OUT to the folder for the results}"
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gguf-lab-two-gpus-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

. "$(dirname "$0")/steps.sh"  # step NAME SECONDS COMMAND...

{ nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'nccl', torch.cuda.nccl.version())"
  nproc; } > "$OUT/machine.txt" 2>&1

step pytest-gpu-two 270 "$PY" -m pytest -m gpu -q -p no:cacheprovider
step tp-8b 120 "$PY" -m gguf_gpu_lab bench --tp --tp-device cuda --tp-worlds 1 2 --params 8B --out-dir "$OUT"
step synth-qwen2 15 "$PY" -m gguf_gpu_lab synth --arch qwen2 --params 1B --weights small "$WORK/qwen2-1B-Q4_K_M.gguf"
step tp-qwen2 70 "$PY" -m gguf_gpu_lab bench --tp --tp-device cuda --tp-worlds 1 2 --model "$WORK/qwen2-1B-Q4_K_M.gguf" \
    --out-dir "$OUT"
step multi-gpu 70 "$PY" -m gguf_gpu_lab bench --multi-gpu --big-params none --out-dir "$OUT"
