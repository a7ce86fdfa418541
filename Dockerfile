# syntax=docker/dockerfile:1
# Two images from one file (docs/kubernetes.md, "Building the images"):
#   docker build --target trainer  -t ghcr.io/instseg/trainer:0.1.0 .
#   docker build --target operator -t ghcr.io/instseg/operator:0.1.0 .
# Build stages hold compilers and pip caches; the final stages get only a virtual environment
# (/opt/venv) and a numeric non-root user (runAsNonRoot can only check a numeric uid).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------- wheel of this project
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY operator/ operator/
COPY contract/ contract/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- trainer environment
FROM ${PYTHON_IMAGE} AS trainer-build
# as pinned in pyproject.toml (trainer extra); tests/test_dockerfile.py checks they agree
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# CUDA build of torch: cu130 needs an NVIDIA driver >= 580; for older drivers build with
# e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# compilers only here, in case a dependency has no wheel for this platform
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" \
        --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY --from=wheel /wheels /wheels
RUN set -e; wheel=$(ls /wheels/instseg-*.whl); pip install --no-cache-dir "${wheel}[trainer,export]" \
    && python -c "import torch, torchvision; assert torch.__version__.startswith('${TORCH_VERSION}')"

# ---------------------------------------------------------------- trainer image
FROM ${PYTHON_IMAGE} AS trainer
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/instseg instseg
COPY --from=trainer-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/instseg
WORKDIR /home/instseg
USER 10001:10001
# the operator's Jobs run `instseg train ...`, or, for several processes, torchrun through
# `python -m instseg_trainer.launch ... -m instseg_trainer.cli train ...`
ENTRYPOINT ["instseg"]
CMD ["--help"]

# ---------------------------------------------------------------- operator environment
FROM ${PYTHON_IMAGE} AS operator-build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=wheel /wheels /wheels
# the operator extra only: kopf, the kubernetes client, prometheus-client; never torch
RUN set -e; wheel=$(ls /wheels/instseg-*.whl); pip install --no-cache-dir "${wheel}[operator]" \
    && ! python -c "import torch" 2>/dev/null

# ---------------------------------------------------------------- operator image
FROM ${PYTHON_IMAGE} AS operator
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp instseg
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8000 8080
# `instseg-operator` is `kopf run -m instseg_operator.handlers` with flags from the
# INSTSEG_* environment the Helm chart sets (namespaces, peering, liveness, logging)
ENTRYPOINT ["instseg-operator"]
