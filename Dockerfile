# The same steps as the README: the Makefile's run venv (.venv-run: the
# package and what example_app imports, no test or lint tools), then
# `make run` starts example_app.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN make .venv-run/.installed
ENV HOST=0.0.0.0 PORT=8000
EXPOSE 8000
CMD ["make", "run"]
