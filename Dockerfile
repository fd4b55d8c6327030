# The image every cluster config names (clusters/aws-gpu.yaml, clusters/gcp-gpu.yaml, clusters/kuberay/*.yaml):
# Ray 2.60 with CUDA, plus maskray and its dependencies (torch, deepspeed, webdataset, mlflow, ...) baked in, so
# nodes and jobs install nothing at start. Build and push it where the nodes can pull it (see README, Clusters):
#   docker build -t my-registry/maskray:latest .
#   docker push my-registry/maskray:latest
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /app
COPY --chown=ray:users . /app
# A regular (not editable) install; /app keeps launch/ and configs/ for `python launch/pretrain.py` in RayJobs.
RUN pip install --no-cache-dir /app \
    && python -c "import deepspeed, maskray, objectives, webdataset; print('maskray', maskray.__file__)"
ENV PYTHONUNBUFFERED=1
