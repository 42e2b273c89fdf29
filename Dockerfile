# The marketplace model served by TorchServe 0.12 (CPU).
#   python -m scripts.archive --run RUN --name marketplace --version 1.0 --store model_store
#   docker build -t marketplace-serve .
#   docker run --rm -p 8080:8080 -p 8081:8081 -p 8082:8082 marketplace-serve
# The image serves every .mar in model_store/ (copied in at build time).
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first (pinned in pyproject.toml), so code edits do not reinstall torch.
COPY pyproject.toml ./
RUN mkdir -p training handlers scripts \
    && touch training/__init__.py handlers/__init__.py scripts/__init__.py README.md \
    && pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu . \
    && pip uninstall -y marketplace-search
COPY training ./training
COPY handlers ./handlers
COPY scripts ./scripts
RUN pip install --no-cache-dir --no-deps .

# Inside a container the APIs must listen on every interface, or the published ports reach nothing:
# the container config below overrides the loopback addresses of config.properties. Tokens stay off
# and the model API on as locally; publish 8081 only to trusted networks, or set
# disable_token_authorization=false and read the keys from /home/model-server/key_file.json.
COPY config.properties ./config.properties
RUN sed -e 's#^inference_address=.*#inference_address=http://0.0.0.0:8080#' \
        -e 's#^management_address=.*#management_address=http://0.0.0.0:8081#' \
        -e 's#^metrics_address=.*#metrics_address=http://0.0.0.0:8082#' \
        -e 's#^model_store=.*#model_store=/app/model_store#' \
        config.properties > config.container.properties \
    && echo "load_models=all" >> config.container.properties

COPY model_store ./model_store

RUN useradd --create-home --home-dir /home/model-server model-server \
    && mkdir -p /home/model-server/tmp /home/model-server/logs \
    && chown -R model-server /home/model-server
USER model-server
WORKDIR /home/model-server
ENV TEMP=/home/model-server/tmp TMPDIR=/home/model-server/tmp LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs

EXPOSE 8080 8081 8082
# /ping is healthy once the frontend is up; per-model readiness is GET :8081/models/NAME.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/ping || exit 1
CMD ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "/app/config.container.properties", \
     "--model-store", "/app/model_store"]
