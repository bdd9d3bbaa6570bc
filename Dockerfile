# prunecxr on a CUDA-enabled PyTorch runtime image (docs/docker.md).
#   docker build -t prunecxr .
#   docker run --rm --init --gpus all --user "$(id -u):$(id -g)" -v "$PWD/outputs:/outputs" prunecxr study
# (--init: an init as PID 1 passes `docker stop`'s SIGTERM on; prunecxr handles it either way,
# ending its run as KILLED.)
# BASE_IMAGE must provide `python` (3.11, as the pins in docker/requirements.txt were made with)
# with torch and torchvision in pyproject.toml's ranges; CI builds on a local stand-in
# (ci/docker/standins.sh) because it cannot pull from public registries.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# Dependencies before source, so that code changes rebuild only the small layers below.
COPY docker/requirements.txt /opt/prunecxr/docker/requirements.txt
RUN python -m pip install -q -r /opt/prunecxr/docker/requirements.txt

COPY pyproject.toml README.md MLproject conda.yaml /opt/prunecxr/
COPY entrypoints /opt/prunecxr/entrypoints
COPY prunecxr /opt/prunecxr/prunecxr
RUN python -m pip install -q /opt/prunecxr && prunecxr --help >/dev/null

# A non-root user; any other uid works too (`docker run --user "$(id -u):$(id -g)"`), so the
# home directory is writable by all.
ARG USER_UID=1000
RUN useradd --non-unique --uid "${USER_UID}" --create-home prunecxr \
    && chmod 1777 /home/prunecxr \
    && mkdir -p /data /outputs \
    && chown prunecxr:prunecxr /data /outputs
# USER: `mlflow run` looks the user up by name, and a --user uid may have no passwd entry.
ENV HOME=/home/prunecxr \
    USER=prunecxr \
    MPLCONFIGDIR=/tmp/matplotlib \
    PRUNECXR_CACHE=/outputs/cache \
    MLFLOW_TRACKING_URI=sqlite:////outputs/mlflow.db
USER prunecxr
WORKDIR /outputs
ENTRYPOINT ["prunecxr"]
CMD ["--help"]
