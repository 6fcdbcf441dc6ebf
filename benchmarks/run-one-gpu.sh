#!/usr/bin/env bash
# The one-GPU checks that issues 19, 20 and 21 wait for, in order of what each resolves, each step
# under its own time limit; the next runs whatever the last one gave. Run from the repository root
# with PYTHONPATH (or an installed package) giving gguf_gpu_lab, CuPy, torch and transformers;
# results go to $OUT. STEPS picks steps (default "pytest remote first": about 13 minutes of limits;
# "export" alone is the 8B export, about 4).
#
#   pytest  pytest -m gpu: every GPU test (log pytest-gpu.log).
#   remote  bench --remote --connections 16 on the 8B file: the load against the raw ranged
#           transfer of the same bytes (targets 1.1x, and 1.05x throttled to 1 GB/s).
#   first   bench --first: a bar's cost in Jupyter kernels, the first load after open, a warm
#           load's first copy (target 5 ms), from_gguf's first call against the import alone.
#   export  the 8B export to bfloat16 against the disk's write speed, peak host memory and
#           transformers' own path on a 1B file (--work-dir /tmp: the export and the disk run write there).
#   export8b  the same with transformers' from_pretrained + save_pretrained on the 8B file itself
#           (about 8 minutes of limit). Both export steps want transformers >= 5.24 (the hf extra's
#           floor) on PYTHONPATH: older ones fall back to their own slow GGUF tokenizer.
#
# Each step's exit status and seconds are in $OUT/steps.txt; its output in $OUT/<step>.log.
# On a host without the test and notebook packages (or with transformers older than 5.24):
#   . benchmarks/wheels-env.sh WHEELS [HF_WHEELS]; OUT=$OUT bash benchmarks/run-one-gpu.sh

set -u
: "${OUT:?set OUT to the folder for the results}"
PY=${PYTHON:-python3}
. "$(dirname "$0")/steps.sh"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import cupy, torch, transformers; print('cupy', cupy.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc; } > "$OUT/machine.txt" 2>&1

for s in ${STEPS:-pytest remote first}; do
    case $s in
        pytest) step pytest-gpu 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider --durations=15 ;;
        remote) step remote 260 "$PY" -m gguf_gpu_lab bench --remote --connections 16 --out-dir "$OUT" ;;
        first) step first 240 "$PY" -m gguf_gpu_lab bench --first --out-dir "$OUT" ;;
        export) step export 250 "$PY" -m gguf_gpu_lab.tools.bench_export --time-limit 240 --reference-vocab 32000 \
            --out-dir "$OUT" --work-dir /tmp ;;
        export8b) step export8b 580 "$PY" -m gguf_gpu_lab.tools.bench_export --time-limit 570 --baseline-params same \
            --reference-vocab 32000 --out-dir "$OUT" --work-dir /tmp ;;
        *) echo "unknown step $s (pytest, remote, first, export, export8b)" >&2; exit 2 ;;
    esac
done
