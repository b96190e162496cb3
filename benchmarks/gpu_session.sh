#!/usr/bin/env bash
# Issue 17's GPU measurements as one prepared script, for a session that is lent an H200
# (../shared/gpu/README.md). Beforehand, on a machine with a registry, from the repo root:
#   bash ../shared/gpu/fetch_wheels.sh        # the wheels the GPU image lacks, into .whl/
# then run this on the GPU machine from the repo root, carrying .whl:
#   OUT=$OUT bash benchmarks/gpu_session.sh
# Each measurement runs under its own timeout, most important first, and writes its files
# as it finishes, so a slow one costs only itself; $OUT/summary.txt has every exit status,
# time and result table. About 16 minutes at most: trim the limits to the time lent.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$OUT/summary.txt"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run it under a timeout, log to $OUT/NAME.log
  local name=$1 limit=$2 start
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

# 1. the roofline (SFT MFU of the 355M and 1.1B models, scan_layers, cuDNN attention; decode
#    vs the bandwidth bound): target <= 6 minutes, compiles included
step roofline 420 python3 -m benchmarks.run --only roofline --ours-only --out "$OUT/roofline"
# 2. its PyTorch peer (SDPA, bf16 autocast, fused AdamW) for the two SFT shapes, each in a
#    fresh process (the roofline's own timing above is without it: the target is ours alone)
step torch_peer 240 python3 -c "import json; from benchmarks import roofline; print(json.dumps(roofline.torch_peers(roofline.RooflineWorkload())))"
# 3. the loop against its bare step, on the GPU
step loop 90 python3 -m benchmarks.run --only loop --ours-only --out "$OUT/loop"
# 4. the embedded pipeline (398-497 s on the 2-core CPU, 2026-12-01; target >= 3x faster)
step pipeline 240 python3 -m rlhf_jax.cli pipeline --workdir "$OUT/pipeline_run"
grep -h "wall_seconds" "$OUT/pipeline_run/report.json" >> "$OUT/summary.txt" 2>/dev/null
for table in "$OUT"/*/table.md; do
  [ -f "$table" ] && { echo "== $table"; cat "$table"; } >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
