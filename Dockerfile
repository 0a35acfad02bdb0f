# The Factory's images. Both install with the command CI uses (`uv sync --frozen`, the RunPod one with
# `--extra gpu`, as scripts/test.sh does), without test tools.
#
#   docker build --target api -t the-factory .            # a process worker for `factory/job` (API models)
#   docker build --target runpod -t the-factory-runpod .  # the RunPod serverless image: CMD python -u handler.py
#
# The RunPod image runs the flow runs the `runpod` worker sends (GPU generation flows, from their bundles)
# and the original `{"input": JobInput}` API. PyPI's torch wheels carry their own CUDA libraries, so the
# base is plain Python; the host needs an NVIDIA driver recent enough for them (RunPod's are).
# Model weights are not downloaded at run time: bake them in under /runpod-volume/models or attach a
# network volume there (FACTORY_MODELS_DIR), and name them `diffusers:<folder>`.

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

FROM api AS runpod
# This process has the GPU: whole jobs sent through the original API generate here (FACTORY_GPU_LOCAL).
ENV FACTORY_GPU_LOCAL=1 FACTORY_MODELS_DIR=/runpod-volume/models HF_HUB_OFFLINE=1
RUN uv sync --frozen --no-dev --extra gpu
CMD ["python", "-u", "handler.py"]
