#!/usr/bin/env bash
# GPU readiness in one command, on one NVIDIA GPU (sized for an H100 or H200: under 8 minutes):
#
#   (a) the paper profile's standard and adversarial step times and their ratio (bf16 autocast,
#       channels_last), and both steps again in NCHW: channels_last on against off, in the same rounds
#       (benchmarks/step_cost.py --profile paper --channels-last both);
#   (b) slices/s of a seed-size adversarial epoch fed by the loader workers, and the peak GPU memory
#       of one paper trial (benchmarks/gpu_epoch.py);
#   (c) a 4-trial demo study packed on the GPU with --gpus-per-trial 0.25 against the same 4 trials
#       one at a time (--max-concurrent 1): the wall-time ratio;
#   (d) the peak GPU memory of each trial process of the packed study (nvidia-smi, sampled every 0.5 s).
#
#   bash benchmarks/gpu_check.sh                 # PYTHON=... to choose the interpreter
#
# Each part runs under its own time limit and the script goes on after a failure; it exits 2 without
# CUDA, 1 if a part failed, 0 otherwise. Everything is written under a temporary folder (kept, and
# printed, for the logs: GPU_CHECK_OUT=DIR to choose it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

if ! "$PY" - <<'EOF'
import sys

try:
    import torch
except ImportError:
    sys.exit(f"error: {sys.executable} has no torch: activate the project's environment, or set PYTHON=")
if not torch.cuda.is_available():
    sys.exit(f"error: benchmarks/gpu_check.sh needs a CUDA GPU: torch {torch.__version__} "
             f"(built for CUDA {torch.version.cuda}) sees none; nothing was measured")
props = torch.cuda.get_device_properties(0)
print(f"GPU: {torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} "
      f"visible; torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
EOF
then
    exit 2
fi

OUT="${GPU_CHECK_OUT:-$(mktemp -d /tmp/mriadv-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
echo "logs and results: $OUT; $(nproc) CPU cores"
failed=()
start=$SECONDS

# part NAME LIMIT_S LOG CMD...: run CMD under a time limit, output to the terminal and LOG
part() {
    local name=$1 limit=$2 log=$3
    shift 3
    echo
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        echo "-- $name: $((SECONDS - t0)) s"
    else
        echo "-- $name FAILED: exit $rc after $((SECONDS - t0)) s$([ "$rc" -eq 124 ] && echo ' (time limit)')"
        failed+=("$name")
    fi
    return "$rc"
}

part "(a) paper step cost, bf16, channels_last on and off" 150 "$OUT/a_step_cost.log" \
    "$PY" benchmarks/step_cost.py --profile paper --precision bf16 --channels-last both --steps 20 --warmup 5

part "(b) seed-size adversarial epoch, loader workers" 120 "$OUT/b_epoch.log" \
    "$PY" benchmarks/gpu_epoch.py --profile paper --batches 60 --warmup 5

# (c) and (d): the same 4 adversarial trials (no epsilon 0: every trial has a generator), demo
# profile, 2 epochs each; the demo data are generated first so neither study pays for it
cat > "$OUT/pack4.yaml" <<'EOF'
description: gpu_check.sh, 4 adversarial demo trials
parameters:
  epsilon: {grid: [1000, 2000, 5000, 10000]}
fixed: {}
objectives:
  - {metric: val_nmse, mode: min}
attack_budgets: [1000, 5000]
scheduler: none
EOF
cpus_per_trial=$(( $(nproc) / 4 > 0 ? $(nproc) / 4 : 1 ))
study=("$PY" study/run.py --space "$OUT/pack4.yaml" --profile demo --max-epochs 2 --gpus-per-trial 0.25
       --cpus-per-trial "$cpus_per_trial" --results "$OUT/results" --no-report)
part "(c) demo data" 60 "$OUT/c_data.log" "$PY" -c "
import sys; from pathlib import Path; sys.path.insert(0, '.')
from mriadv.config import get_profile; from mriadv.data.loading import synthetic_data
print(synthetic_data(get_profile('demo'), Path('$OUT/results')))"

sampler=()
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 500 > "$OUT/d_apps.csv" 2>&1 &
    sampler+=($!)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/d_gpu.csv" 2>&1 &
    sampler+=($!)
fi
t0=$SECONDS
part "(c) 4 trials packed, --gpus-per-trial 0.25" 100 "$OUT/c_packed.log" "${study[@]}" --name packed
packed_rc=$?
packed_s=$((SECONDS - t0))
for pid in "${sampler[@]}"; do kill "$pid" 2> /dev/null; wait "$pid" 2> /dev/null; done
t0=$SECONDS
part "(c) the same 4 trials one at a time, --max-concurrent 1" 160 "$OUT/c_serial.log" "${study[@]}" --name serial \
    --max-concurrent 1
serial_rc=$?
serial_s=$((SECONDS - t0))

echo
echo "================ summary ($((SECONDS - start)) s; logs in $OUT)"
head -n 1 "$OUT/a_step_cost.log" 2> /dev/null
grep -E "^(standard step|adversarial step)  " "$OUT/a_step_cost.log" 2> /dev/null | awk '{print "(a) " $1 " " $2 ": " $3 " ms"}'
grep -E "^ratio:" "$OUT/a_step_cost.log" 2> /dev/null | sed 's/^/(a) adversarial \/ standard /'
grep -E "^channels_last on / off:" "$OUT/a_step_cost.log" 2> /dev/null | sed 's/^/(a) /'
grep -E "slices/s|^peak GPU memory" "$OUT/b_epoch.log" 2> /dev/null | sed 's/^/(b) /'
if [ "$packed_rc" -eq 0 ] && [ "$serial_rc" -eq 0 ]; then
    echo "(c) 4 demo trials x 2 epochs: packed ${packed_s} s, one at a time ${serial_s} s, ratio packed/serial" \
         "$(awk -v p="$packed_s" -v s="$serial_s" 'BEGIN {printf "%.2f", p / s}')" \
         "(whole commands: Ray start and shutdown included)"
else
    echo "(c) not measured: a study failed (see $OUT/c_*.log)"
fi
if [ -s "$OUT/d_apps.csv" ] && grep -q "^[0-9]" "$OUT/d_apps.csv"; then
    awk -F', *' '/^[0-9]/ {if ($2 + 0 > peak[$1]) peak[$1] = $2 + 0}
                 END {n = 0; for (p in peak) {printf "(d) process %s: peak %d MiB\n", p, peak[p]; n++}
                      printf "(d) %d GPU processes during the packed study (trial actors, and the driver if it touched CUDA)\n", n}' \
        "$OUT/d_apps.csv"
elif [ -s "$OUT/d_gpu.csv" ] && grep -q "^[0-9]" "$OUT/d_gpu.csv"; then
    echo "(d) nvidia-smi lists no processes here (a container's PID namespace?); the whole GPU's used memory" \
         "peaked at $(sort -n "$OUT/d_gpu.csv" | tail -n 1) MiB during the packed study, i.e. about" \
         "$(awk -v m="$(sort -n "$OUT/d_gpu.csv" | tail -n 1)" 'BEGIN {printf "%d", m / 4}') MiB per trial"
else
    echo "(d) not measured: nvidia-smi unavailable or it recorded nothing"
fi
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
