# The grassroots image: one image for every process of the production shape (docker-compose.yml
# runs it as `db upgrade`, `serve`, `worker`, `beat` and `flower`).

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/grassroots
WORKDIR /src
# The dependencies first, at the exact versions of the lock file (hash-checked): a layer that only
# changes with the lock.
COPY requirements/runtime.txt requirements/runtime.txt
RUN /opt/grassroots/bin/pip install --require-hashes -r requirements/runtime.txt
# Then only what `pip install .` needs: the project's metadata and its three packages (the
# Alembic migrations ship inside models/ as package data). tests/test_compose.py builds a wheel
# from exactly these paths, so a file missing here fails a test, not a deploy.
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY tasks/ tasks/
COPY models/ models/
RUN /opt/grassroots/bin/pip install . --no-deps


FROM python:3.11-slim

ENV PATH=/opt/grassroots/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 grassroots \
    && useradd --system --uid 10001 --gid grassroots --home-dir /app --create-home \
       --shell /usr/sbin/nologin grassroots
COPY --from=build /opt/grassroots /opt/grassroots
WORKDIR /app
# `grassroots beat` keeps its schedule file under ./var.
RUN mkdir var && chown grassroots:grassroots var
USER grassroots:grassroots

# The webhook, the ops API and console (serve --ops-port 8001), Flower.
EXPOSE 8000 8001 5555
ENTRYPOINT ["grassroots"]
CMD ["--help"]
