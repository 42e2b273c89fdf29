#!/usr/bin/env bash
# Build the Docker image and check it in a running container, without a Docker engine (make image-test).
#   bash scripts/image-test.sh [all|check|build]   # as root; check: only the container checks, on the image already
#                                                  # built; build: only the image
# Adapted from ../shared/tools/container-build.sh: a Debian bookworm stand-in for python:3.11-slim-bookworm
# (mmdebstrap), the Dockerfile built unchanged with buildah, the container run with podman + runc.
# Checks: the image's user is not root; /ping healthy; the model READY (time from start); a prediction with the
# inference token -> 200 with a JSON answer holding "category"; without it, or with the management key, refused
# (TorchServe 0.12 answers 400 InvalidKeyException, not 401); the model-control API refused (405);
# `podman stop` (SIGTERM, like `docker stop`) ends the container cleanly in under 5 s (timed).
# Needs a .mar in model_store/: when there is none, a tiny model is trained and archived first (~30 s, .venv).
# Env: W (work folder, default /tmp/container-build), IMAGE (default marketplace-serve), PY (default .venv/bin/python),
#      TORCH_INDEX_URL / ALLOW_CUDA_TORCH (default: the CPU index when reachable, else PyPI with CUDA allowed).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
W=${W:-/tmp/container-build}
IMAGE=${IMAGE:-marketplace-serve}
PY=${PY:-$REPO/.venv/bin/python}
MODEL=marketplace
SHARED=$REPO/../shared
STORE=(--root "$W/storage" --runroot "$W/runroot" --storage-driver overlay)
# No systemd here: cgroupfs, file events, and podman's complaints about healthcheck timers filtered out.
P() { podman "${STORE[@]}" --cgroup-manager cgroupfs --events-backend file --runtime runc "$@" \
        2> >(grep -v 'unable to get systemd connection' >&2); }
# podman's default rlimits are refused here (no CAP_SYS_RESOURCE past conmon's hard limits).
UL=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
FAILED=0
check() {  # check NAME CONDITION-RESULT(0/1) DETAIL
  if [ "$2" = 0 ]; then echo "PASS  $1${3:+: $3}"; else echo "FAIL  $1${3:+: $3}"; FAILED=1; fi
}
mkdir -p "$W"
[ "$(id -u)" = 0 ] || { echo "image-test needs root (buildah/podman, chroot isolation)" >&2; exit 2; }

tools() {
  command -v buildah >/dev/null && command -v mmdebstrap >/dev/null && command -v runc >/dev/null \
    && command -v podman >/dev/null && return
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    buildah podman mmdebstrap runc conmon containernetworking-plugins slirp4netns uidmap catatonit \
    golang-github-containers-common
}

# A stand-in for python:3.11-slim-bookworm: Debian bookworm minbase + Debian's python3.11 + pip, shaped like the
# official image (pip allowed system-wide, python/pip in /usr/local/bin, LANG). Made once, kept in $W/storage.
base() {
  P image exists docker.io/library/python:3.11-slim-bookworm && return
  local uri
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  uri=${uri:-$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)}
  uri=${uri:-http://deb.debian.org/debian}
  mmdebstrap --variant=minbase --format=tar \
    --include=ca-certificates,netbase,tzdata,python3,python3-pip,python3-venv \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='ln -sf /usr/bin/python3 "$1"/usr/local/bin/python; ln -sf /usr/bin/python3 "$1"/usr/local/bin/python3; ln -sf /usr/bin/pip3 "$1"/usr/local/bin/pip; ln -sf /usr/bin/pip3 "$1"/usr/local/bin/pip3' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "$W/bookworm-py311.tar" \
    "deb ${uri%/} bookworm main" "deb ${uri%/} bookworm-updates main" "deb ${uri%/}-security bookworm-security main"
  P import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$W/bookworm-py311.tar" docker.io/library/python:3.11-slim-bookworm
  rm -f "$W/bookworm-py311.tar"
}

# model_store/marketplace-v1.0.mar, when the store has no archive: 60 listings, MobileNetV2 (offline weights when
# ../shared has them), one epoch, small photos. Only a fixture for the serving checks: its answers are poor.
model() {
  if compgen -G "model_store/*.mar" >/dev/null; then echo "model store: $(ls model_store/*.mar | tr '\n' ' ')"; return; fi
  local out=work/image-test data weights=none
  rm -rf "$out"
  if [ -f "$SHARED/data/marketplace/Products.csv" ]; then
    data=$SHARED/data/marketplace
  else
    data=$out/data; "$PY" -m training.sample --out "$data" --listings 60 --categories 4
  fi
  [ -f "$SHARED/weights/mobilenet_v2_imagenet_features.pth" ] && weights=$SHARED/weights/mobilenet_v2_imagenet_features.pth
  "$PY" -m training.pipeline --data "$data" --out "$out" --max-listings 60 --size 128 --arch mobilenet_v2 \
    --weights "$weights" --epochs 1 --feature-views 1 --no-baseline --workers 1 --resize 128 --crop 112 | tail -3
  "$PY" -m scripts.archive --run "$(ls -d "$out"/model_evaluation/*/ | tail -1)" --name "$MODEL" --version 1.0 \
    --store model_store
}

build() {
  # The Dockerfile's default is PyTorch's CPU wheel index; where it cannot be reached (as on the machines this
  # was written on) fall back to PyPI's CUDA build, allowed explicitly, and say so.
  local index=${TORCH_INDEX_URL:-} allow=${ALLOW_CUDA_TORCH:-}
  if [ -z "$index" ]; then
    if curl -fsS -m 15 -o /dev/null https://download.pytorch.org/whl/cpu/torch/; then
      index=https://download.pytorch.org/whl/cpu
    else
      index=https://pypi.org/simple; allow=1
      echo "NOTE: download.pytorch.org is unreachable: building with PyPI's CUDA torch (ALLOW_CUDA_TORCH=1)"
    fi
  fi
  # pip inside RUN steps gets the host's CA bundle (TLS-intercepting proxies), mounted, never in the image.
  printf '[global]\ncert = /etc/pip-ca.pem\nretries = 1\n' > "$W/pip.conf"
  local t0=$SECONDS rc
  set +e
  buildah "${STORE[@]}" bud --isolation chroot --pull=never --format docker --layers \
    -v "$W/pip.conf:/etc/pip.conf:ro" -v /etc/ssl/certs/ca-certificates.crt:/etc/pip-ca.pem:ro \
    --build-arg TORCH_INDEX_URL="$index" --build-arg ALLOW_CUDA_TORCH="${allow:-0}" \
    -t "$IMAGE" . 2>&1 | tee "$W/build.log" | grep --line-buffered -E '^(STEP|COMMIT|--> Using cache|torch |WARNING)'
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" = 0 ] || { echo "build failed: see $W/build.log" >&2; tail -20 "$W/build.log" >&2; exit 1; }
  BUILD_SECONDS=$((SECONDS - t0))
  echo "build seconds: $BUILD_SECONDS (torch index $index, ALLOW_CUDA_TORCH=${allow:-0})"
}

ms() { python3 -c 'import time; print(int(time.time() * 1000))'; }

run_checks() {
  set +e  # every check runs and reports; the summary decides
  name=image-test-$$; local photo=$W/probe.jpg
  # A photo to send: a real listing photo when ../shared has them, else a generated one.
  local src; src=$(ls "$SHARED"/data/marketplace/images/*.jpg 2>/dev/null | head -1 || true)
  if [ -n "$src" ]; then cp "$src" "$photo"
  else "$PY" -c "from PIL import Image; Image.new('RGB', (320, 240), (180, 90, 40)).save('$photo', quality=90)"; fi
  trap 'P rm -f "$name" >/dev/null 2>&1 || true' EXIT
  # --network none: the container gets its own network namespace with only lo, so the checks run inside it
  # (podman exec). With Docker: -p 127.0.0.1:8080:8080 ... (see README, Docker).
  local t0; t0=$(ms)
  P run -d "${UL[@]}" --name "$name" --network none --log-driver k8s-file \
    -v "$REPO/model_store:/home/model-server/model-store:ro" -v "$photo:/tmp/probe.jpg:ro" "$IMAGE" >/dev/null
  local key mkey ready=1 i
  for i in $(seq 1 120); do
    key=$(P exec "$name" cat /home/model-server/key_file.json 2>/dev/null || true)
    if [ -n "$key" ]; then
      mkey=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["management"]["key"])' <<<"$key")
      if P exec "$name" curl -fsS -H "Authorization: Bearer $mkey" "http://127.0.0.1:8081/models/$MODEL" 2>/dev/null \
          | grep -q '"READY"'; then ready=0; break; fi
    fi
    sleep 0.5
  done
  READY_SECONDS=$(python3 -c "print(round(($(ms) - $t0) / 1000, 1))")
  check "model $MODEL READY" "$ready" "${READY_SECONDS} s after podman run"
  [ "$ready" = 0 ] || { P logs "$name" 2>&1 | tail -30; }
  local ikey; ikey=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["inference"]["key"])' <<<"$key")
  echo "key_file.json: /home/model-server/key_file.json ($(python3 -c 'import json, sys; print(", ".join(json.load(sys.stdin)))' <<<"$key"))"

  local uids; uids=$(P exec "$name" sh -c "id -un; grep -h '^Uid:' /proc/[0-9]*/status | awk '{print \$2}' | sort -u | tr '\n' ' '")
  uids=$(echo $uids)
  [[ "$uids" =~ ^model-server\ 1000$ ]]; check "non-root" $? "user and process uids: $uids"
  local ping; ping=$(P exec "$name" curl -sS -H "Authorization: Bearer $ikey" http://127.0.0.1:8080/ping)
  grep -q '"Healthy"' <<<"$ping"; check "/ping (inference token)" $? "$(echo $ping)"
  P healthcheck run "$name" >/dev/null 2>&1; check "HEALTHCHECK" $?

  local body code
  body=$(P exec "$name" curl -sS -w '\nHTTP %{http_code}' -H "Authorization: Bearer $ikey" \
    -H 'Content-Type: image/jpeg' --data-binary @/tmp/probe.jpg "http://127.0.0.1:8080/predictions/$MODEL")
  code=${body##*HTTP }; body=${body%$'\n'HTTP *}
  [ "$code" = 200 ] && python3 -c 'import json, sys; a = json.load(sys.stdin); sys.exit(0 if "category" in json.dumps(a) else 1)' <<<"$body"
  check "prediction with the inference token" $? "HTTP $code, $(head -c 300 <<<"$body" | tr -d '\n')..."
  # photo + title: the text model and its sentence encoder (torch.export + tokenizers) served by the image
  body=$(P exec "$name" curl -sS -w '\nHTTP %{http_code}' -H "Authorization: Bearer $ikey" -H 'X-Title: wooden garden bench' \
    -H 'Content-Type: image/jpeg' --data-binary @/tmp/probe.jpg "http://127.0.0.1:8080/predictions/$MODEL")
  code=${body##*HTTP }; body=${body%$'\n'HTTP *}
  [ "$code" = 200 ] && python3 -c 'import json, sys; a = json.load(sys.stdin); sys.exit(0 if a.get("inputs") == ["photo", "title"] else 1)' <<<"$body"
  check "photo + title (text model with its sentence encoder)" $? "HTTP $code, $(head -c 200 <<<"$body" | tr -d '\n')..."
  # TorchServe 0.12 refuses a missing or wrong key with 400 InvalidKeyException (not 401).
  local auth label
  for auth in "" "Authorization: Bearer $mkey"; do
    label=${auth:+with the management key}; label=${label:-without a token}
    body=$(P exec "$name" curl -sS -w '\nHTTP %{http_code}' ${auth:+-H "$auth"} -H 'Content-Type: image/jpeg' \
      --data-binary @/tmp/probe.jpg "http://127.0.0.1:8080/predictions/$MODEL")
    code=${body##*HTTP }; body=${body%$'\n'HTTP *}
    [[ "$code" =~ ^40[01]$ ]] && grep -q 'Token Authorization failed' <<<"$body"
    check "prediction $label refused" $? "HTTP $code, $(echo $body)"
  done
  code=$(P exec "$name" curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $ikey" \
    -H 'Content-Type: image/jpeg' --data-binary @/tmp/probe.jpg "http://127.0.0.1:8080/predictions/$MODEL")
  [ "$code" = 200 ]; check "same request, inference token again" $? "HTTP $code"
  code=$(P exec "$name" curl -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $mkey" \
    "http://127.0.0.1:8081/models?url=marketplace-v1.0.mar&model_name=other")
  [ "$code" -ge 400 ]; check "model-control API off (register refused)" $? "HTTP $code"

  # `docker stop`: SIGTERM, then SIGKILL after the timeout (10 s); a clean stop exits 0 well before it.
  local stop_at; stop_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  t0=$(ms)
  P stop -t 10 "$name" >/dev/null
  STOP_SECONDS=$(python3 -c "print(round(($(ms) - $t0) / 1000, 1))")
  local exit_code; exit_code=$(P inspect "$name" --format '{{.State.ExitCode}}')
  python3 -c "import sys; sys.exit(0 if $STOP_SECONDS < 5 and $exit_code == 0 else 1)"
  check "graceful stop (SIGTERM)" $? "${STOP_SECONDS} s, exit code $exit_code"
  echo "--- the container's log from the stop on:"; P logs --since "$stop_at" "$name" 2>&1 | tail -8
  P rm -f "$name" >/dev/null
  set -e
}

case ${1:-all} in
  all) tools; base; model; build; run_checks ;;
  check) model; run_checks ;;   # the image already built
  build) tools; base; build ;;  # the image only (the local fleet's, scripts/fleet.py)
  *) echo "usage: $0 [all|check|build]" >&2; exit 2 ;;
esac
SIZE=$(P image inspect "$IMAGE" --format '{{.Size}}')
[ "${1:-all}" = build ] && { echo "image $IMAGE: $(python3 -c "print(f'{$SIZE / 1e9:.2f} GB')"); build $BUILD_SECONDS s"; exit 0; }
echo "image $IMAGE: $(python3 -c "print(f'{$SIZE / 1e9:.2f} GB')"); build ${BUILD_SECONDS:-(not run)} s; READY ${READY_SECONDS} s; stop ${STOP_SECONDS} s"
[ "$FAILED" = 0 ] && echo "image-test: all checks passed" || { echo "image-test: FAILED"; exit 1; }
