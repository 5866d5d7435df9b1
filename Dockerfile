# One image for every platform process; docker-compose.yml picks the process by command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
RUN pip install . \
    && useradd --create-home --uid 10001 orchestrator \
    && mkdir /data && chown orchestrator /data
# schemas/ sits beside the packages rather than inside them; importing from the source
# tree keeps paths relative to the packages valid.
ENV PYTHONPATH=/app \
    ORCH_DATA_DIR=/data

# Anything written relative to the working directory (e.g. Faust table data) lands in /data.
WORKDIR /data
USER orchestrator
CMD ["orchestrator", "--help"]
