#!/usr/bin/env bash
# Run a command inside lit_attn's virtual environment, creating or updating it first.
#   bash scripts/with_env.sh <command> [args...]
# The environment lives outside the checkout (default ~/.cache/lit_attn/venv, override with
# LIT_ATTN_VENV) so that fresh clones reuse it; it is re-synced when pyproject.toml changes.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${LIT_ATTN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lit_attn/venv}
python=${PYTHON:-python3}
stamp="$venv/.lit_attn_deps"
want=$(sha256sum "$repo/pyproject.toml" | cut -c1-16)

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  mkdir -p "$(dirname "$venv")"
  free_kb=$(df -Pk "$(dirname "$venv")" | awk 'NR==2 {print $4}')
  if [ ! -x "$venv/bin/python" ] && [ "${free_kb:-0}" -lt 8000000 ]; then
    echo "lit_attn: need about 8 GB free under $(dirname "$venv") for the environment (torch, CUDA libs);" \
         "found $((free_kb / 1024)) MB. Free disk space or set LIT_ATTN_VENV to another folder." >&2
    exit 1
  fi
  echo "lit_attn: preparing environment in $venv" >&2
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # torch comes in through torchvision's pin (there is no CPU-only torchvision wheel).
  "$venv/bin/python" -m pip install -q -e "$repo[dev]" >&2
  echo "$want" > "$stamp"
else
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo" >&2
fi
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
export WANDB_MODE=${WANDB_MODE:-offline}
cd "$repo"
exec "$@"
