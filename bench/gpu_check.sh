#!/usr/bin/env bash
# GPU check: the trainer's CUDA path end to end, in a few minutes on one GPU (never run on the CPU-only CI).
#
#   make install && bash bench/gpu_check.sh [STEPS]
#
# 1. writes a synthetic latent dataset (256-px images as 32x32x4 latents, 77x768 text embeddings, precomputed);
# 2. trains the DiT-B/2 preset in bf16 with DeepSpeed's FusedAdam (both picked by detection) for STEPS steps
#    (default 300) on one GPU and prints samples/s, TFLOP/s and MFU against the GPU's peak (tessera/device.py);
# 3. trains half the steps, resumes from that checkpoint to the end, and compares the resumed run's losses with
#    the uninterrupted run's (bf16 kernels are not bitwise reproducible on GPUs: the check allows 2%);
# 4. with 2 or more GPUs, repeats 2 and 3 on 2 ranks over NCCL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${1:-300}
BATCH=${BATCH:-32}
PRESET=${PRESET:-B}  # PRESET=tiny ALLOW_CPU=1 bash bench/gpu_check.sh 10 smoke-tests this script on a CPU
WORK=${WORK:-$(mktemp -d /tmp/tessera-gpu-check.XXXXXX)}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ] && [ "${ALLOW_CPU:-0}" != 1 ]; then echo "gpu_check: no CUDA device found" >&2; exit 1; fi
echo "gpu_check: $NGPU GPU(s); work dir $WORK"

$PY - "$WORK/data" <<'EOF'
import sys
from tests.trainer.data.dataset_factory import write_dataset
write_dataset(sys.argv[1], shards=4, per_shard=256, buckets={"256x256": 1.0}, variants={"alt": 1.0},
              emb={"synthetic-te": (77, 768)}, latent={"synthetic-ae": (4, 32, 32)}, smooth=True)
print("dataset written:", sys.argv[1])
EOF

cat > "$WORK/train.yaml" <<EOF
run: {root: $WORK/runs}
tracking: {mode: offline}
model: {name: dit, dit: {preset: $PRESET, in_channels: 4, text_dim: 768}}
text_encoder: {name: hf_encoder}
autoencoder: {name: identity}
objective: {name: flow}
cfg_dropout: {p: 0.0}
data: {path: $WORK/data, batch_size: $BATCH, num_workers: 4, text_encoder_id: synthetic-te, autoencoder_id: synthetic-ae}
optim: {lr: 1.0e-4, warmup_samples: 1000}
deepspeed: {stage: 2, precision: auto, fused_adam: auto}
train: {log_every_samples: $((BATCH * 10)), ckpt_every_samples: 100000000}
samples: {enabled: false}
EOF

check() {  # check NPROC
  local n=$1 total=$((STEPS * BATCH * $1)) half=$((STEPS / 2 * BATCH * $1))
  echo "== $n rank(s): $STEPS steps of DiT-$PRESET/2, batch $BATCH per rank"
  .venv/bin/tessera train --config "$WORK/train.yaml" --nproc "$n" run.id="full$n" train.total_samples=$total
  .venv/bin/tessera train --config "$WORK/train.yaml" --nproc "$n" run.id="half$n" train.total_samples=$half
  .venv/bin/tessera train --config "$WORK/train.yaml" --nproc "$n" run.id="half$n" train.total_samples=$total
  $PY - "$WORK/runs/full$n" "$WORK/runs/half$n" <<'EOF'
import json, sys
rows = lambda d: {r["step"]: r for r in map(json.loads, open(f"{d}/metrics.jsonl"))}
full, resumed = rows(sys.argv[1]), rows(sys.argv[2])
last = full[max(full)]
print(f"samples/s {last['samples_per_s']:.1f}  TFLOP/s {last['tflops_per_s']:.2f}  MFU {100 * last['mfu']:.1f}%  "
      f"memory {last['memory_gb']:.1f} GB  grad norm {last['grad_norm']:.3f}")
log = open(f"{sys.argv[2]}/logs/rank0.log").read()
assert "resumed from" in log, "the second half did not resume"
steps = sorted(set(full) & set(resumed))
gap = max(abs(full[s]["loss"] - resumed[s]["loss"]) / abs(full[s]["loss"]) for s in steps)
print(f"resume: {len(steps)} logged steps compared, max relative loss difference {gap:.2e}")
sys.exit(0 if gap < 0.02 else 1)
EOF
}

check 1
[ "$NGPU" -lt 1 ] && { echo "gpu_check: CPU smoke test OK"; exit 0; }
if [ "$NGPU" -ge 2 ]; then check 2; fi
echo "gpu_check: OK"
