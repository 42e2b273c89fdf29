# The marketplace model served by TorchServe 0.12, CPU only.
#   docker build -t marketplace-serve .
#   docker run -d --name marketplace -p 127.0.0.1:8080:8080 -p 127.0.0.1:8081:8081 -p 127.0.0.1:8082:8082 \
#       -v "$PWD/model_store:/home/model-server/model-store:ro" marketplace-serve
#   docker exec marketplace cat /home/model-server/key_file.json   # the keys (inference, management, API); they
#                                                                  # expire after 60 min: renew with the API key
# Models are not baked in: the image serves every .mar in the mounted store (load_models=all) at start.
# Build args:
#   TORCH_INDEX_URL   where torch/torchvision come from (default: PyTorch's CPU wheel index)
#   ALLOW_CUDA_TORCH  1 = accept a CUDA build of torch (e.g. TORCH_INDEX_URL=https://pypi.org/simple where the
#                     CPU index is unreachable): 5.7 GB instead of ~1.8 GB, runs on CPU all the same. Default 0:
#                     such a build fails at the check step instead of silently shipping CUDA wheels.
# Debian release pinned: python:3.11-slim follows Debian's newest release (trixie), which has no OpenJDK 17.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl tini \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, from pyproject.toml alone, so code edits (and new packages) do not reinstall torch.
# torch and torchvision come only from TORCH_INDEX_URL (no fallback to PyPI's CUDA wheels), the rest from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG ALLOW_CUDA_TORCH=0
COPY pyproject.toml /tmp/deps/
RUN python -c 'import re, tomllib; \
deps = tomllib.load(open("/tmp/deps/pyproject.toml", "rb"))["project"]["dependencies"]; \
name = lambda d: re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip().lower(); \
torch = [d for d in deps if name(d) in ("torch", "torchvision")]; \
open("/tmp/deps/torch.txt", "w").write("\n".join(torch) + "\n"); \
open("/tmp/deps/rest.txt", "w").write("\n".join(d for d in deps if d not in torch) + "\n")' \
    && cat /tmp/deps/torch.txt
# A CUDA torch (its metadata requires nvidia-*/cuda-* packages) fails the build here, before ~2.5 GB of CUDA
# libraries are downloaded, unless ALLOW_CUDA_TORCH=1. Then Triton is removed: it only compiles GPU kernels,
# torch imports and runs on CPU without it (-0.9 GB). The nvidia-* packages cannot go: libtorch_cuda.so links them.
RUN set -e; \
    pip install --no-deps --index-url "$TORCH_INDEX_URL" -r /tmp/deps/torch.txt \
        || { echo "torch/torchvision could not be installed from TORCH_INDEX_URL=$TORCH_INDEX_URL" >&2; exit 1; }; \
    if python -c 'import sys; from importlib.metadata import requires; \
sys.exit(not any(r.startswith(("nvidia-", "cuda-")) for r in requires("torch") or []))'; then \
        if [ "$ALLOW_CUDA_TORCH" != 1 ]; then \
            echo "a CUDA build of torch came from TORCH_INDEX_URL=$TORCH_INDEX_URL: use the CPU index" \
                 "(https://download.pytorch.org/whl/cpu) or --build-arg ALLOW_CUDA_TORCH=1" >&2; \
            exit 1; \
        fi; \
        echo "WARNING: CUDA build of torch allowed (ALLOW_CUDA_TORCH=1)"; \
    fi; \
    pip install -r /tmp/deps/torch.txt -r /tmp/deps/rest.txt; \
    if pip show -q triton 2>/dev/null; then pip uninstall -y triton; fi; \
    python -c 'import faiss, torch, torchvision; print("torch", torch.__version__, "CUDA", torch.version.cuda, "torchvision", torchvision.__version__)'; \
    rm -rf /tmp/deps

# The code: the whole source tree as filtered by .dockerignore (no venv, work, logs, model_store, .git, tests),
# installed as declared by pyproject.toml, so a new package is picked up without touching this file.
COPY . /app
RUN pip install --no-deps /app && rm -rf /app/build /app/*.egg-info

# TorchServe's configuration: the repository's config.properties with the container's settings forced over it,
# whatever the file says: APIs on every interface inside the container (publish them on 127.0.0.1 only),
# token authorisation on, model-control API off, archives only from the local store, every .mar in it loaded.
RUN sed -E '/^[[:space:]]*(inference_address|management_address|metrics_address|model_store|load_models|disable_token_authorization|enable_model_api|allowed_urls|enable_envvars_config)[[:space:]]*[=:]/d' \
        /app/config.properties > /etc/marketplace-serve.properties \
    && printf '%s\n' '' '# Forced by the Dockerfile:' \
        'inference_address=http://0.0.0.0:8080' \
        'management_address=http://0.0.0.0:8081' \
        'metrics_address=http://0.0.0.0:8082' \
        'model_store=/home/model-server/model-store' \
        'load_models=all' \
        'disable_token_authorization=false' \
        'enable_model_api=false' \
        'allowed_urls=file:///home/model-server/model-store/[^/]+[.]mar' \
        'enable_envvars_config=false' \
        >> /etc/marketplace-serve.properties \
    && cat /etc/marketplace-serve.properties

# PID 1 is tini; it passes `docker stop`'s SIGTERM (or Ctrl-C's SIGINT) to this script, which runs
# `torchserve --stop` (the frontend shuts down and its workers exit) instead of being killed after the timeout.
# Any other command (`docker run IMAGE python ...`) runs as given.
RUN printf '%s\n' '#!/bin/sh' \
        'case "${1:-}" in ""|-*) ;; *) exec "$@" ;; esac' \
        'cd /home/model-server' \
        'torchserve --start --foreground --ncs --ts-config /etc/marketplace-serve.properties "$@" &' \
        'ts=$!' \
        'trap '"'"'torchserve --stop --foreground; wait "$ts"; exit 0'"'"' TERM INT' \
        'wait "$ts"' \
        > /usr/local/bin/marketplace-serve \
    && chmod 755 /usr/local/bin/marketplace-serve

# Non-root. Its home is TorchServe's working folder: key_file.json (the tokens) is written there.
RUN useradd --uid 1000 --create-home --home-dir /home/model-server model-server \
    && mkdir -p /home/model-server/model-store /home/model-server/tmp /home/model-server/logs \
    && chown -R model-server:model-server /home/model-server
USER model-server
WORKDIR /home/model-server
ENV TEMP=/home/model-server/tmp TMPDIR=/home/model-server/tmp LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs

EXPOSE 8080 8081 8082
# /ping is healthy once the frontend is up (per-model readiness: GET :8081/models/NAME). With tokens on, TorchServe
# 0.12 wants the inference key even for /ping: the check reads it from key_file.json.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS -H "Authorization: Bearer $(python -c 'import json; print(json.load(open("/home/model-server/key_file.json"))["inference"]["key"])')" \
        http://127.0.0.1:8080/ping || exit 1
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/marketplace-serve"]
