# One image for the whole cluster: the Ray head and workers (KubeRay), the RayJob submitter and the
# MLflow server. `python -m pipeline` / `pipeline`, `ray` and `mlflow` are on PATH; the experiments are
# in /app/conf and the job specs in /app/jobs.
#
#   docker build -t pipeline:0.1.0 .
#   docker build -t pipeline:0.1.0-cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The tag is the version in pyproject.toml; k8s/ names the image pipeline:0.1.0.
FROM python:3.11-slim

# wget: KubeRay's exec health probes call it (older KubeRay, or a Ray version it predates).
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# KubeRay's convention (and the rayproject/ray images'): user `ray`, uid 1000. The pods run as it.
RUN groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The Ray of every node, of the submitter and of the laptop that submits should be one version; it is
# k8s/base/raycluster.yaml's spec.rayVersion too (tests/test_k8s.py checks the two agree).
ARG RAY_VERSION=2.60.0
# Empty: PyPI's torch, which carries CUDA (GPU nodes). The CPU index makes an image a few GB smaller.
ARG TORCH_INDEX_URL=

WORKDIR /app
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch torchvision; \
    fi

COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY conf/ conf/
COPY jobs/ jobs/
# [cluster]: psycopg (3) and boto3, for the MLflow server's PostgreSQL store and S3 artifacts.
RUN pip install --no-cache-dir ".[cluster]" "ray[default,train,tune,serve]==${RAY_VERSION}" \
    && rm -rf build pipeline.egg-info

USER 1000:1000
CMD ["python", "-m", "pipeline", "--help"]
