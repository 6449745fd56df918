# PrivAds application image (API, workers, learner, one-shot jobs).
#
#   docker build -t privads:latest .
#   docker build --build-arg TORCH_INDEX_URL=<cpu-only wheel index> -t privads:latest .
#
# docker-compose.yml supplies the full command for each service; the default
# CMD runs everything in one container.
FROM python:3.11-slim

# Optional wheel index for torch (e.g. a CPU-only index). Empty = pip's default.
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    PRIVADS_DATA=/var/lib/privads

WORKDIR /app

# torch first, in its own layer, so code changes don't re-download it.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "torch==2.13.0"; \
    else \
        pip install "torch==2.13.0"; \
    fi

COPY . /app
RUN pip install /app

# Non-root runtime user; the data dir is created here so named volumes mounted
# at /var/lib/privads inherit its ownership.
RUN useradd --system --create-home --uid 10001 --user-group privads \
    && mkdir -p /var/lib/privads \
    && chown -R privads:privads /var/lib/privads /app
USER privads

EXPOSE 8000

CMD ["privads", "up"]
