# Sourced by the benchmarks' one-call scripts (run-one-gpu.sh, run-two-gpus.sh), with OUT set.
# step NAME SECONDS COMMAND...: run under a time limit (the whole process group), its output in
# $OUT/NAME.log, and its exit status and seconds in $OUT/steps.txt (124: it ran out of time).
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0)) limit=$limit" | tee -a "$OUT/steps.txt"
}
