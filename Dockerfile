# The Factory, API-only image: a process worker that runs `factory/job` flow runs.
#   docker build -t the-factory .
#   docker run -e PREFECT_API_URL=... -e ANTHROPIC_API_KEY=... the-factory
# It installs with the same command as CI (`uv sync --frozen`), without the test tools.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy \
    FACTORY_STORAGE_ROOT=/var/lib/factory PATH=/opt/factory/.venv/bin:$PATH
RUN pip install --no-cache-dir uv
WORKDIR /opt/factory

COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY factory ./factory
COPY flows ./flows
COPY tasks ./tasks
COPY blocks ./blocks
COPY prefect.yaml ./
RUN uv sync --frozen --no-dev && mkdir -p /var/lib/factory

CMD ["prefect", "worker", "start", "--pool", "factory-local"]
