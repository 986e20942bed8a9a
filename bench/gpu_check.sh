#!/usr/bin/env bash
# GPU check: the trainer's CUDA path end to end on a fresh GPU machine with no network, in under 8 minutes on one
# H100; prints one JSON (bench/gpu_check.py says what it measures) and exits 1 when a check failed.
#
#   make wheelhouse                                  # here, once: build/wheelhouse (about 25 MiB)
#   bash bench/gpu_check.sh [--steps N]              # there, with build/wheelhouse carried beside the tree
#   bash bench/gpu_check.sh --cpu-dry-run            # anywhere: the same path with a tiny model on the CPU
#
# The machine's python3 must have torch, transformers, peft, safetensors, pyarrow, numpy and pillow. Tessera,
# DeepSpeed (no prebuilt ops) and diffusers come from the wheelhouse: pip installs from it alone (--no-index), into
# a prefix under the work dir, only what the image lacks; the image's own packages are left as they are. Without a
# wheelhouse, python3 must import tessera, deepspeed and diffusers itself (e.g. `make install`, PY=.venv/bin/python).
#
# Options: --wheelhouse DIR (default build/wheelhouse, or $WHEELHOUSE), --work DIR (default a new temp dir),
# --steps N, --cpu-dry-run. PY picks the interpreter (default python3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
WHEELHOUSE=${WHEELHOUSE:-$REPO/build/wheelhouse}
WORK=${WORK:-}
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELHOUSE=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --steps) ARGS+=(--steps "$2"); shift 2 ;;
    --cpu-dry-run) ARGS+=(--cpu-dry-run); shift ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
done
WORK=${WORK:-$(mktemp -d /tmp/tessera-gpu-check.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
# DeepSpeed compiles an op on first use (on the CPU: its shared-memory collective): into the work dir, never
# into a cache another installation of DeepSpeed uses.
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TESSERA_NO_PROGRESS=1 WANDB_MODE=disabled
echo "gpu_check: work dir $WORK" >&2

START=$SECONDS
site_dir() {  # where pip put the packages under the prefix (lib/pythonX.Y/site-packages, or Debian's variant)
  local found
  found=$(find "$WORK/prefix" -type d -path '*-packages/tessera' 2>/dev/null | head -n 1)
  if [ -n "$found" ]; then dirname "$found"; fi
}
if [ -d "$WHEELHOUSE" ]; then
  # Refuses a wheelhouse built from other sources than this tree; prints what to install.
  "$PY" "$REPO/bench/wheelhouse.py" check "$WHEELHOUSE" > "$WORK/install.txt"
  # A rerun in the same work dir keeps what it installed (and the ops DeepSpeed compiled against it).
  SITE=$(site_dir)
  if [ -n "$SITE" ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
  # Only the wheelhouse: no index, and no pip configuration of the machine (its find-links, constraints).
  PIP=(env PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --disable-pip-version-check --no-index
       --find-links "$WHEELHOUSE" --prefix "$WORK/prefix")
  "${PIP[@]}" -r "$WORK/install.txt" >&2
  # Tessera without its declared dependencies (Ray, W&B, ...): the check does not need them.
  "${PIP[@]}" --no-deps --force-reinstall tessera >&2
  if [ -z "$SITE" ]; then SITE=$(site_dir); export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
  WHAT="\"wheelhouse\": \"$WHEELHOUSE\", \"site\": \"$SITE\""
else
  echo "gpu_check: no wheelhouse at $WHEELHOUSE: using $PY's own packages" >&2
  WHAT="\"wheelhouse\": null"
fi
# The check runs outside the repository: there, `import tessera` would find its source folder, not the package.
cd "$WORK"
"$PY" -c "import tessera.trainer.loop, deepspeed, diffusers" >&2 || {
  echo "gpu_check: $PY cannot import tessera.trainer, deepspeed and diffusers (see above)" >&2; exit 2; }
echo "{$WHAT, \"seconds\": $((SECONDS - START))}" > "$WORK/install.json"
exec "$PY" "$REPO/bench/gpu_check.py" --work "$WORK" --repo "$REPO" --install "$WORK/install.json" ${ARGS[@]+"${ARGS[@]}"}
