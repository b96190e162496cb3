#!/usr/bin/env bash
# Issue 17's GPU measurements as one prepared script, for a session that is lent an H200
# (../shared/gpu/README.md). Beforehand, on a machine with a registry, from the repo root:
#   bash ../shared/gpu/fetch_wheels.sh        # the wheels the GPU image lacks, into .whl/
# then on the GPU machine, from the repo root, carrying .whl:
#   OUT=$OUT bash benchmarks/gpu_session.sh roofline loop     # first call, ~9 minutes at most
#   OUT=$OUT bash benchmarks/gpu_session.sh pipeline          # second call, ~3.5 minutes at most
# With no argument it runs every step in this order: roofline, loop, pipeline, torch_peer.
#
# Sized to the device machine's limits (/work/.library/device/README.md): one command runs
# at most 10 minutes, a session has 15 minutes of device time with the machine's start, and
# at most 8 files come back from $OUT. So each step runs under its own timeout, most
# important first, works in /tmp/gpu_work and copies at most two files into $OUT as soon as
# it ends (a step killed by a later timeout costs only itself). $OUT/summary.txt holds every
# exit status, time and result table. torch_peer comes last: its figures on this GPU are in
# ../shared/gpu/README.md already (2026-11-29); the targets are ours alone.
set -u
OUT=${OUT:-gpu_results}
WORK=/tmp/gpu_work
mkdir -p "$OUT" "$WORK"
SUMMARY="$OUT/summary.txt"
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then  # a warm machine keeps /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed || { echo "wheel install failed" | tee -a "$SUMMARY"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$SUMMARY" 2>&1
git log -1 --format='project at %h %cs' >> "$SUMMARY" 2>/dev/null

step() {  # step NAME SECONDS COMMAND...: run it under a timeout, log to $WORK/NAME.log
  local name=$1 limit=$2 start
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$SUMMARY"
  tail -c 100000 "$WORK/$name.log" > "$OUT/$name.log"
}

keep() {  # keep SOURCE NAME: copy a result file into $OUT, and its table into the summary
  [ -f "$1" ] && cp "$1" "$OUT/$2"
  [ -f "$(dirname "$1")/table.md" ] && { echo "== $2"; cat "$(dirname "$1")/table.md"; } >> "$SUMMARY"
}

run_step() {
  case $1 in
    # the roofline: SFT MFU of the 355M and 1.1B models (scan_layers, cuDNN attention, bf16)
    # and decode vs the bandwidth bound. Target: <= 6 minutes, compiles included
    roofline)
      step roofline 420 python3 -m benchmarks.run --only roofline --ours-only --out "$WORK/roofline"
      keep "$WORK/roofline/roofline.json" roofline.json ;;
    # the stage loop against its bare step, on the GPU
    loop)
      step loop 90 python3 -m benchmarks.run --only loop --ours-only --out "$WORK/loop"
      keep "$WORK/loop/loop.json" loop.json ;;
    # the embedded pipeline: 398-497 s on the 2-core CPU (2026-12-01); target >= 3x faster.
    # A run killed at the limit resumes where it stopped when this step runs again.
    pipeline)
      step pipeline 200 python3 -m rlhf_jax.cli pipeline --workdir "$WORK/pipeline_run"
      keep "$WORK/pipeline_run/report.json" pipeline_report.json
      python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print('pipeline wall_seconds', r['wall_seconds'], 'stages', r['stage_seconds'])" \
        "$WORK/pipeline_run/report.json" >> "$SUMMARY" 2>&1 ;;
    # the PyTorch peer (SDPA, bf16 autocast, fused AdamW) of both SFT shapes, each in a
    # fresh process (JAX takes 75% of the GPU's memory at its first use)
    torch_peer)
      step torch_peer 240 python3 -c "import json; from benchmarks import roofline; print(json.dumps(roofline.torch_peers(roofline.RooflineWorkload())))" ;;
    *) echo "unknown step $1 (roofline, loop, pipeline, torch_peer)" | tee -a "$SUMMARY"; return 2 ;;
  esac
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(roofline loop pipeline torch_peer)
for name in "${steps[@]}"; do run_step "$name"; done
cat "$SUMMARY"
