"""docker-compose.yml and the Dockerfile agree with what example_app reads.

No Docker engine runs here, so the file is validated statically: services,
ports, environment and healthchecks against the app's own configuration.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _env_read_by_app() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "example_app").glob("*.py"):
        names |= set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', path.read_text()))
    return names


def test_services_and_roles() -> None:
    services = _compose()["services"]
    assert set(services) == {"app", "backend", "db"}
    # app and backend are the same image in two roles.
    assert services["app"]["build"] == services["backend"]["build"] == "."
    assert services["app"]["environment"]["DOWNSTREAM_URL"] == "http://backend:8000"
    assert "DOWNSTREAM_URL" not in services["backend"]["environment"]


def test_environment_is_what_the_app_reads() -> None:
    read = _env_read_by_app()
    assert {"DATABASE_URL", "DOWNSTREAM_URL", "HOST", "PORT"} <= read
    for name in ("app", "backend"):
        env = _compose()["services"][name]["environment"]
        unknown = set(env) - read
        assert not unknown, f"{name} sets variables the app never reads: {unknown}"
        assert env["DATABASE_URL"].startswith("postgresql://postgres:postgres@db:5432/")
        assert env["HOST"] == "0.0.0.0"


def test_database_url_matches_db_service() -> None:
    services = _compose()["services"]
    db_env = services["db"]["environment"]
    expected = (
        f"postgresql://{db_env['POSTGRES_USER']}:{db_env['POSTGRES_PASSWORD']}"
        f"@db:5432/{db_env['POSTGRES_DB']}"
    )
    for name in ("app", "backend"):
        assert services[name]["environment"]["DATABASE_URL"] == expected


def test_ports_and_healthchecks() -> None:
    services = _compose()["services"]
    assert services["app"]["ports"] == ["8000:8000"]
    port = services["app"]["environment"]["PORT"]
    assert services["app"]["ports"][0].split(":")[1] == port
    for name, service in services.items():
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD", name
    for name in ("app", "backend"):
        # The healthcheck hits a route the app really serves.
        assert "/healthz" in " ".join(services[name]["healthcheck"]["test"])
    app_source = (ROOT / "example_app" / "app.py").read_text()
    assert 'Route("/healthz"' in app_source
    assert services["app"]["depends_on"]["backend"]["condition"] == "service_healthy"
    assert services["backend"]["depends_on"]["db"]["condition"] == "service_healthy"


def test_postgres_backstop_setting() -> None:
    command = _compose()["services"]["db"]["command"]
    assert "client_connection_check_interval=100ms" in command


def test_image_builds_with_the_readme_commands() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make run" in readme and "make test" in readme
    assert 'CMD ["make", "run"]' in dockerfile
    # The install step is the Makefile's own venv target, nothing hand-rolled.
    assert "RUN make .venv-run/.installed" in dockerfile
    assert "$(VENV)/.installed:" in makefile
    assert "pip install" not in dockerfile


def test_db_healthcheck_over_tcp_and_apps_restart() -> None:
    """Issue 9, point 9: pg_isready without -h checks the Unix socket, which
    answers during the image's init server; the apps restart if they start early."""
    services = _compose()["services"]
    check = services["db"]["healthcheck"]["test"]
    assert check[check.index("-h") + 1] == "127.0.0.1"
    for name in ("app", "backend"):
        assert services[name]["restart"] in ("on-failure", "unless-stopped", "always"), name
    assert "TRUSTED_PROXIES" not in services["backend"]["environment"]
