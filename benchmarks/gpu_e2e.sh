#!/usr/bin/env bash
# Issue 4's end-to-end run: `stageserve up` on one GPU with the default model, then `stageserve bench`
# and one generation through the gateway. Usage: benchmarks/gpu_e2e.sh MODEL.gguf OUTDIR
set -euo pipefail
model=$1 out=$2
mkdir -p "$out"
stageserve up --model "$model" --gateway-port 50051 > "$out/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  grep -q 'stageserve is up' "$out/up.log" && break
  kill -0 $up 2>/dev/null || { tail -40 "$out/up.log"; exit 1; }
  sleep 1
done
grep 'stageserve is up' "$out/up.log"
stageserve generate "What is the capital of France?" --chat --target 127.0.0.1:50051 --json | tee "$out/generate.json"
for c in 1 32; do
  stageserve bench --target 127.0.0.1:50051 --num-prompts $((c * 8)) --input-len 256 --output-len 128 \
    --concurrency $c --json --no-progress > "$out/bench_c$c.json"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('concurrency $c:', {k: d[k] for k in d if not isinstance(d[k], dict)}); [print(' ', k, d[k]) for k in ('ttft','itl','e2e') if k in d]" "$out/bench_c$c.json"
done
