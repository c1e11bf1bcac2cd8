# syntax=docker/dockerfile:1
# CPU image by default; CUDA with --build-arg TORCH=cu128 (docker-compose.gpu.yml does).
# One image for the api and the workers; its HEALTHCHECK is the api's (compose gives the
# workers their own: splitz worker --check).
ARG PYTHON=3.11
FROM python:${PYTHON}-slim AS base
ARG TORCH=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SPLITZ_MODEL_DIR=/app/models
WORKDIR /app
RUN useradd --create-home --uid 10001 splitz
COPY pyproject.toml README.md ./
COPY splitz ./splitz
COPY app ./app
COPY worker ./worker
RUN pip install --extra-index-url "https://download.pytorch.org/whl/${TORCH}" .
COPY --chown=splitz models ./models
USER splitz
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["splitz", "serve", "--host", "0.0.0.0", "--port", "8000"]
