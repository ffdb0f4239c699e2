# asyncproc container image: `docker build -t asyncproc .` from the source tree.
# The Helm chart's default image (ghcr.io/asyncproc/asyncproc) is built from this file.
# A pinned base tag (bump it deliberately, with a test run), pinned dependency versions.
FROM python:3.11.7-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY setup.cfg setup.py README.rst constraints.txt ./
COPY asyncproc ./asyncproc
RUN pip install -c constraints.txt . && rm -rf /src

# A fixed non-root user, as the chart's securityContext expects (runAsUser 10001).
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin asyncproc
USER 10001:10001
WORKDIR /

EXPOSE 9090
ENTRYPOINT ["asyncproc"]
CMD ["--help"]
