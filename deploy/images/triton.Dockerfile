# syntax=docker/dockerfile:1
# NVIDIA's Triton with recstack's production model repository (docs/deploy.md).
#   recstack repo configs --runtime production --out deploy/triton/model_repository --release N
#   docker build -f deploy/images/triton.Dockerfile -t recstack-triton:0.1.0 .
# 26.06: the newest container whose FIL backend docs/triton.md checked the production
# ranker config against (24.03-26.06; FIL there builds Treelite 4.7.0, our checkpoints are
# Treelite 4.8.1, read across minor versions). The -py3 image has the onnxruntime, fil and
# python backends.
FROM nvcr.io/nvidia/tritonserver:26.06-py3
# The production repository written by `recstack repo configs --runtime production`
# (native onnxruntime_onnx and fil backends, KIND_GPU instance groups; written with
# RECSTACK_DEVICE=cpu for CPU nodes). Empty in a checkout (README.md only): the cluster's
# Triton reads the shared volume instead and this copy is the fallback for `docker run`.
COPY --chown=triton-server:triton-server deploy/triton/model_repository/ /models/
# triton-server: the unprivileged user NVIDIA's image creates; its uid is not documented,
# so the name is used (DL3066: a name may not resolve on the host; it does in the image).
# hadolint ignore=DL3066
USER triton-server
# HTTP (readiness /v2/health/ready), gRPC, metrics: settings.py's triton_*_port.
EXPOSE 8000 8001 8002
ENTRYPOINT ["tritonserver"]
# Flags as orchestrator/triton_server.py's triton_argv: the orchestrator loads and pins
# each release's versions through the repository API (explicit model control). The
# manifests replace these to add the repository API key from a Secret.
CMD ["--model-repository=/models", "--model-control-mode=explicit", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", "--strict-readiness=true", "--exit-timeout-secs=8", "--log-verbose=0"]
