# Source this on a GPU host to run the benchmarks with packages the host lacks, from wheel folders
# copied beside the tree (no network there):
#
#   . benchmarks/wheels-env.sh WHEELS [HF_WHEELS]
#
# WHEELS: gguf and libgguf (the test dependencies), plus nb/ with nbclient, ipykernel, ipywidgets and
# their dependencies (bench --first's kernels). HF_WHEELS (optional): transformers >= 5.24 (the hf
# extra's floor), huggingface_hub and tokenizers and what they need, without numpy, laid over the
# host's own (the export steps want it: an older transformers has no GGUF tokenizer module to hand
# this project's parse to). Each goes to a folder of its own under /tmp, put first on PYTHONPATH,
# with the tree itself; what is installed is printed.
_wheels=${1:?usage: . benchmarks/wheels-env.sh WHEELS [HF_WHEELS]}
_py=${PYTHON:-python3}
rm -rf /tmp/gguf-lab-site /tmp/gguf-lab-site-nb /tmp/gguf-lab-site-hf
"$_py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gguf-lab-site "$_wheels"/*.whl || return 1
if [ -d "$_wheels/nb" ]; then
    "$_py" -m pip install -q --no-index --no-compile --find-links "$_wheels/nb" --target /tmp/gguf-lab-site-nb \
        nbclient ipykernel ipywidgets >/dev/null 2>&1 || echo "wheels-env: the notebook wheels did not install" >&2
fi
export PYTHONPATH=/tmp/gguf-lab-site:$PWD:/tmp/gguf-lab-site-nb${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${2:-}" ]; then
    "$_py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gguf-lab-site-hf "$2"/*.whl || return 1
    export PYTHONPATH=/tmp/gguf-lab-site-hf:$PYTHONPATH
fi
export PYTHONUNBUFFERED=1
"$_py" -c "import gguf, transformers; print('wheels-env: gguf', gguf.__file__, '| transformers', transformers.__version__)" \
    2>/dev/null || echo "wheels-env: gguf or transformers does not import with this PYTHONPATH" >&2
unset _wheels _py
