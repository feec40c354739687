# EDM2 runtime image for GPU users.
#
# The image holds the environment only; the code is mounted at run time, as in
#   docker build --tag edm2:latest .
#   docker run --gpus all -it --rm --user $(id -u):$(id -g) \
#       -v `pwd`:/scratch --workdir /scratch -e HOME=/scratch \
#       edm2:latest \
#       python generate_images.py --preset=edm2-img512-s-guid-dino --outdir=out
#
# PyTorch (with CUDA and cuDNN) comes from the base image; pick another release with
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:<tag> --tag edm2:latest .
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# No .pyc files in the mounted working tree, and log lines appear as they are printed.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The project's Python requirements; torch is already in the base image and is left as it is.
COPY requirements.txt /tmp/edm2-requirements.txt
RUN python -m pip install --no-cache-dir -r /tmp/edm2-requirements.txt \
    && rm /tmp/edm2-requirements.txt

# `docker run --user UID:GID` starts a user without a passwd entry or a home folder. Give every
# user a writable default HOME (sticky and world-writable, like /tmp), so the download caches
# ($HOME/.cache/dnnlib, $HOME/.cache/huggingface, $HOME/.cache/torch) work without extra flags;
# `-e HOME=/scratch` or `-e DNNLIB_CACHE_DIR=...` put them on a persistent volume instead.
# /scratch is world-writable too, for runs that use the working folder without mounting it.
RUN mkdir -p /home/edm2/.cache /scratch && chmod 1777 /home/edm2 /home/edm2/.cache /scratch
ENV HOME=/home/edm2

WORKDIR /scratch
CMD ["python", "--version"]
