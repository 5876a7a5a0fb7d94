# pagedserve on the NGC Triton Inference Server image.
#
#   docker build -t pagedserve .
#   docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -v "$PWD/model_repository:/models" pagedserve tritonserver --model-repository /models
#
# The image also holds a ready repository with the small trained default model:
#   docker run --gpus all --rm -p 8000-8002:8000-8002 pagedserve \
#       tritonserver --model-repository /opt/pagedserve/model_repository
#
# The image's own tritonserver and python backend are used (its stub runs the image's
# python3, where pagedserve is installed); the backend goes to
# /opt/tritonserver/backends/pagedserve/model.py, where `backend: "pagedserve"` finds it.
ARG TRITON_VERSION=25.01
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

# Ubuntu 24.04 marks the system Python as externally managed; this image is its only user.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/pagedserve
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY kernels ./kernels
# torch from PyPI (CUDA build), Triton-language kernels, and the clients for the examples.
RUN python3 -m pip install ".[kernels]" "tritonclient[grpc,http]>=2.50" requests \
    && pagedserve install-backend /opt/tritonserver/backends

COPY model_repository ./model_repository
COPY client_examples ./client_examples

EXPOSE 8000 8001 8002
