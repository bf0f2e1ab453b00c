# The gateway image. Build from the repository root: docker build -f deploy/gateway.Dockerfile .
#   target "gateway" (default in docker-compose.yml): no torch, no Triton; it talks to the Triton
#     service named by PALM_TRITON_URL.
#   target "cpu" (deploy/compose.cpu.yml): the same plus the tritonserver of the nvidia-pytriton wheel
#     and the model repository, so the gateway runs its own Triton on the CPU (no GPU, no Triton image).
# Both listen beyond loopback, so they need API keys: the gateway refuses to start until one exists
# (docker compose run --rm gateway palm-serve keys create --tenant NAME).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
COPY palm_serve ./palm_serve
COPY export/__init__.py ./export/__init__.py
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim AS gateway
RUN useradd --system --uid 10001 --home-dir /var/lib/palm palm \
    && mkdir -p /var/lib/palm && chown palm /var/lib/palm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY model_repository/palm/1/model_card.json /opt/palm/model_repository/palm/1/model_card.json
USER palm
ENV PALM_DATA_DIR=/var/lib/palm \
    PALM_HOST=0.0.0.0 \
    PALM_AUTH__MODE=api-key \
    PALM_PORT=8000 \
    PALM_TRITON__MODEL_REPOSITORY=/opt/palm/model_repository \
    MALLOC_MMAP_THRESHOLD_=131072 \
    MALLOC_TRIM_THRESHOLD_=131072
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["palm-serve", "serve"]

FROM gateway AS cpu
USER root
# The wheel pins numpy<2 for its own Python modules, which the gateway does not use: only its
# tritonserver binary and python backend (the model's I/O goes through DLPack, see model_repository/).
RUN pip install --no-cache-dir --no-deps nvidia-pytriton==0.7.0
COPY model_repository /opt/palm/model_repository
USER palm
ENV PALM_TRITON__MODEL_CONFIG_NAME=cpu
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)" || exit 1
