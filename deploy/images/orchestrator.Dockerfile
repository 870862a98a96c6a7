# syntax=docker/dockerfile:1
# The recstack image: the `recstack` CLI and the orchestrator (docs/deploy.md).
#   docker build -f deploy/images/orchestrator.Dockerfile -t recstack:0.1.0 .
#   docker build -f deploy/images/orchestrator.Dockerfile --target tools -t recstack-tools:0.1.0 .
# Same install as `make setup` (Makefile, target $(VENV)/.stamp): the project editable,
# every version from requirements/app.lock as pip constraints, without the [dev] extra.
# The tree stays at /opt/recstack so recstack/settings.py's PROJECT_ROOT finds
# feature_repo/ and the committed model_repository/ configs as in a checkout.

# Exact tag: the Python the lock was resolved with (3.11.7), Debian 12 like the dev hosts.
FROM python:3.11.7-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/recstack
RUN python -m venv /opt/recstack/.venv
ENV PATH=/opt/recstack/.venv/bin:$PATH
COPY pyproject.toml ./
COPY requirements/app.lock requirements/app.lock
COPY recstack/ recstack/
COPY exporters/ exporters/
COPY orchestrator/ orchestrator/
COPY loadtest/ loadtest/
# The lock pins torch==2.13.0+cpu: the CPU wheel is on PyTorch's CPU index (an unpinned
# torch from PyPI pulls several GB of CUDA wheels, DESIGN.md).
RUN pip install -c requirements/app.lock \
        --extra-index-url https://download.pytorch.org/whl/cpu -e . \
    && python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
        orchestrator/recommender.proto

FROM python:3.11.7-slim-bookworm AS app
# libgomp1: LightGBM's and FAISS's OpenMP runtime (the wheels link the system's).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1=12.2.0-14+deb12u1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin recstack
WORKDIR /opt/recstack
COPY --from=build /opt/recstack /opt/recstack
COPY feature_repo/ feature_repo/
COPY model_repository/ model_repository/
# Paths and addresses for a container: state on the mounted volume (the manifests mount
# /var/lib/recstack), servers on every interface (settings.py's loopback defaults would
# be unreachable from other pods). Ports stay settings.py's defaults.
# HOME: uid 10001 has no home folder and the root filesystem is read-only in the
# manifests; libraries that cache under ~ (matplotlib's config dir) get /tmp.
ENV PATH=/opt/recstack/.venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RECSTACK_DATA_DIR=/var/lib/recstack/data \
    RECSTACK_RELEASES_DIR=/var/lib/recstack/releases \
    RECSTACK_MODEL_REPOSITORY=/var/lib/recstack/model_repository \
    RECSTACK_RUN_DIR=/tmp/recstack-run \
    RECSTACK_ORCHESTRATOR_HOST=0.0.0.0
USER 10001:10001
# gRPC, HTTP, Prometheus metrics (settings.py: orchestrator_grpc/http/metrics_port).
EXPOSE 50051 8080 9100
ENTRYPOINT ["recstack"]
CMD ["serve", "orchestrator"]

# The tools image, for the training and promotion Jobs: `recstack release promote`
# validates a release by loading it in a scratch embedded Triton
# (exporters/release_validate.py), which needs .venv-triton, the environment `make setup`
# builds from requirements/triton.lock; `recstack train` compiles the ranker with tl2cgen,
# which needs a C compiler (exporters/ranker_export.py, toolchain gcc).
FROM app AS tools
USER 0:0
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev=2.36-9+deb12u14 \
    && rm -rf /var/lib/apt/lists/*
COPY requirements/triton.txt requirements/triton.lock requirements/
RUN python -m venv /opt/recstack/.venv-triton \
    && /opt/recstack/.venv-triton/bin/pip install --no-cache-dir --disable-pip-version-check \
        -c requirements/triton.lock -r requirements/triton.txt
USER 10001:10001
