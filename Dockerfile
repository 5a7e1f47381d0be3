# mixserve: CPU image by default; serves the embedded demo model on :8000.
#
#   docker build -t mixserve .                                              # CPU
#   docker build -t mixserve:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .   # GPU
#   docker run -p 8000:8000 mixserve
#   docker run --gpus all -p 8000:8000 -v /models:/models mixserve:cuda \
#       mixserve serve --host 0.0.0.0 --model /models/base --adapters /models/adapters --device cuda --dtype bfloat16
#
# The CUDA build installs torch's CUDA wheels (they carry the CUDA runtime); the host needs the NVIDIA
# driver and container toolkit. BASE_IMAGE may be swapped for another Python 3.11 image.

ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtual environment with torch and mixserve -----------------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen wheel index, so that `pip install .` finds it satisfied.
RUN pip install --index-url ${TORCH_INDEX_URL} torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY merging ./merging
COPY server ./server
# mixserve/: the CLI, mixserve.eval and mixserve.demo (the demo model's files ship as package data)
COPY mixserve ./mixserve
RUN pip install ".[postgres]" && rm -rf /src

# ---- runtime: the venv only, a non-root user --------------------------------------------------------
FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
RUN useradd --create-home --uid 10001 mixserve
USER mixserve
WORKDIR /home/mixserve
EXPOSE 8000
# /health answers while the model loads; readiness (/ready) is for load balancers and k8s.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
STOPSIGNAL SIGTERM
CMD ["mixserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
