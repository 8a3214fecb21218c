# syntax=docker/dockerfile:1
#
# ssn-deploy on NVIDIA Triton Inference Server. Two targets:
#
#   triton (default)  tritonserver serving the default model repository, baked in /models
#                     (affinity_onnx on the GPU, affinity_py, agglomerate, segment)
#   cli               the ssn-deploy command line, for jobs and dask workers
#
#   docker build -t ssn-deploy:triton .
#   docker build --target cli -t ssn-deploy:cli .
#   docker run --gpus all --shm-size 1g -p 8000-8002:8000-8002 ssn-deploy:triton
#   docker run --rm -v "$PWD/data:/data" ssn-deploy:cli infer /data/raw.zarr \
#       --backend triton --url HOST:8001
#
# Every install step is docker/install.sh, which tests/test_docker.py runs in a clean virtual
# environment (Docker cannot run in CI). The python backend of Triton gets its own environment
# (numpy<2, which that backend needs) and finds it first on PATH; the command line gets
# ssn-deploy with the GPU extra (numpy 2).

ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.12-py3

FROM ${TRITON_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The base image's tag pins the distribution, and with it these packages.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 ssn \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin ssn
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/ssn-deploy/src
COPY pyproject.toml constraints.txt README.md ./
COPY ssn_deploy ./ssn_deploy
COPY docker/install.sh ./docker/install.sh

FROM base AS cli
RUN docker/install.sh cli /opt/ssn-deploy/venv gpu,serve
ENV PATH=/opt/ssn-deploy/venv/bin:$PATH
USER 10001:10001
WORKDIR /data
ENTRYPOINT ["ssn-deploy"]
CMD ["--help"]

FROM cli AS repository
RUN ssn-deploy serve build-repo -o /home/ssn/models

FROM base AS triton
RUN docker/install.sh server /opt/ssn-deploy/server
ENV PATH=/opt/ssn-deploy/server/bin:$PATH
COPY --from=repository --chown=10001:10001 /home/ssn/models /models
USER 10001:10001
WORKDIR /models
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS http://127.0.0.1:8000/v2/health/ready || exit 1"]
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/models", "--strict-readiness=true", "--exit-on-error=false"]
