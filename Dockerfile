# geosteer on a CUDA machine: the same environment as `make setup`, with the CUDA build of torch.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /geosteer
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1

# torch first and pinned (CUDA 12.8 wheels), so the project's dependency range installs nothing more.
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128

COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY models models
COPY data data
COPY configs configs
COPY benchmarks benchmarks
COPY tests tests
RUN pip install --no-cache-dir -e '.[dev]'

# Outputs and the Hugging Face cache belong on mounted volumes:
#   docker run --gpus all -v $PWD/outputs:/geosteer/outputs -v ~/.cache/huggingface:/root/.cache/huggingface \
#     geosteer stage=extract model=llama31_8b
ENTRYPOINT ["pipeline"]
CMD ["stage=all", "trainer=gpu"]
