# The gateway alone (no torch, no embedded Triton): it talks to the Triton service named by
# PALM_TRITON_URL. Build from the repository root: docker build -f deploy/gateway.Dockerfile .
# It listens beyond loopback, so it needs API keys: it refuses to start until one exists
# (docker compose run --rm gateway palm-serve keys create --tenant NAME).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY gateway ./gateway
COPY export/__init__.py ./export/__init__.py
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim
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
