# The same two steps as the README: `make` creates .venv and installs the
# package, `make run` starts example_app.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN make .venv/.installed
ENV HOST=0.0.0.0 PORT=8000
EXPOSE 8000
CMD ["make", "run"]
