# batchinf on Ray's CPU image: the head (dashboard, Jobs API, dispatcher, job drivers), the CPU
# worker type (fetch + decode, CPU replicas), the dispatcher and cron pods.
#
#   docker build -t batchinf:0.1.0-ray2.60.0-py311-cpu .
#
# The base image's Ray and Python must be the ones pyproject.toml pins (ray 2.60, Python 3.11):
# tests/test_deploy.py checks that, and runs this file's install steps in a fresh venv.
FROM rayproject/ray:2.60.0-py311-cpu

ENV PYTHONUNBUFFERED=1

# The base image's user `ray` (uid 1000, group users 100), numeric so that Kubernetes'
# runAsNonRoot can verify it. BuildKit (the builder of docker build since Docker 23, of compose
# and of buildx) creates the WORKDIR owned by this user, so the build writes /app as ray.
USER 1000:100
WORKDIR /app

# The dependencies first, in a layer of their own, so that a code change does not reinstall
# TensorFlow. The list is read from pyproject.toml, the one place the versions are pinned.
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

# Then the package itself (the build context is cut down to it by .dockerignore), and the job
# specs in jobs/, which land in /app/jobs for cron (deploy/k8s/cronjob.yaml).
COPY --chown=1000:100 . ./
RUN pip install --no-cache-dir --no-deps . \
    && pip check
