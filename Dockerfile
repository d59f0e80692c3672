# Image that runs an Agora worker on an NVIDIA GPU. Built by `python3 agora_cli.py --use_docker`
# (or by hand: docker build . -t agora_worker). It holds the dependencies only, pinned by
# constraints.txt; the repository is mounted at /home/agora at run time and put on PYTHONPATH,
# so the code that runs is the checkout's.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Python 3.11 exactly, as for native runs; the deadsnakes PPA provides it on Ubuntu 22.04.
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install "pip==25.3"
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/agora-build
# Only what decides the dependencies, so code edits do not invalidate this layer.
COPY constraints.txt ./
COPY agora_server/pyproject.toml agora_server/pyproject.toml
COPY agora/pyproject.toml agora/pyproject.toml
COPY agora_server/src agora_server/src
COPY agora/src agora/src
RUN python3.11 -m pip install --constraint constraints.txt --build-constraint constraints.txt ./agora_server ./agora \
    && ln -sf /opt/venv/bin/python3.11 /usr/local/bin/python3.11

WORKDIR /home/agora
CMD ["python3.11", "agora/src/agora/run_server.py", "--help"]
