# The Factory's images. Both install with the same command as CI (`uv sync --frozen`), without test tools.
#
#   docker build --target api -t the-factory .         # a process worker for `factory/job` (API models)
#   docker build --target runpod -t the-factory-runpod .  # the RunPod serverless image: CMD python -u handler.py
#
# The RunPod image runs flow runs the `runpod` worker sends (and the original `{"input": JobInput}` API).

FROM python:3.11-slim AS api
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
COPY workers ./workers
COPY prefect.yaml handler.py ./
RUN uv sync --frozen --no-dev && mkdir -p /var/lib/factory
CMD ["prefect", "worker", "start", "--pool", "factory-local"]

FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04 AS runpod
ENV PYTHONUNBUFFERED=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_INSTALL_DIR=/opt/python \
    FACTORY_STORAGE_ROOT=/var/lib/factory PATH=/opt/factory/.venv/bin:$PATH
COPY --from=api /usr/local/bin/uv /usr/local/bin/uv
WORKDIR /opt/factory
COPY --from=api /opt/factory/pyproject.toml /opt/factory/uv.lock /opt/factory/README.md ./
RUN uv python install 3.11 && uv sync --frozen --no-dev --no-install-project --python 3.11
COPY --from=api /opt/factory/factory ./factory
COPY --from=api /opt/factory/flows ./flows
COPY --from=api /opt/factory/tasks ./tasks
COPY --from=api /opt/factory/blocks ./blocks
COPY --from=api /opt/factory/workers ./workers
COPY --from=api /opt/factory/prefect.yaml /opt/factory/handler.py ./
RUN uv sync --frozen --no-dev --python 3.11 && mkdir -p /var/lib/factory
CMD ["python", "-u", "handler.py"]
