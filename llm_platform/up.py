"""`bash scripts/run`: everything a newcomer needs, one command.

Starts embedded PostgreSQL and Redis when DATABASE_URL / REDIS_URL are unset, migrates, loads
the sample routes, makes sure a demo tenant exists (printing a key once), then serves the
platform (uvicorn: HTTP + WebSocket), a Celery worker and the usage writer until Ctrl-C.

While it runs, `.data/run.env` holds what it chose itself (the embedded servers' URLs, the
generated secret), so that `manage.py` in another shell reaches the same servers
(llm_platform/settings.py reads it); the file goes when the run command stops.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from .embedded import EmbeddedPostgres, EmbeddedRedis, port_open

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _say(text: str) -> None:
    print(f"[platform] {text}", flush=True)


def _secret_key(data: Path) -> str:
    path = data / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


def _write_run_env(path: Path, values: dict[str, str]) -> None:
    """Owner-only, replaced atomically: a reader never sees half a file."""
    lines = [f"# written by the run command, pid {os.getpid()}; removed when it stops",
             f"GW_RUN_PID={os.getpid()}", *(f"{name}={value}" for name, value in values.items())]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _remove_run_env(path: Path) -> None:
    """Only our own file: another run command may have written one since."""
    try:
        if f"GW_RUN_PID={os.getpid()}\n" in path.read_text():
            path.unlink()
    except FileNotFoundError:
        pass


def _manage(*args: str, capture: bool = False) -> str:
    result = subprocess.run([PY, "manage.py", *args], cwd=ROOT, check=True, text=True,
                            stdout=subprocess.PIPE if capture else None)
    return result.stdout or ""


BOOTSTRAP = """
from django.contrib.auth import get_user_model
from tenants.models import Tenant
from tenants.services import create_tenant, issue_key
import secrets
out = {}
if not Tenant.objects.filter(slug="demo").exists():
    create_tenant("demo", name="Demo tenant", tier="default")
    out["key"] = issue_key("demo", name="demo key")[1]
User = get_user_model()
if not User.objects.filter(username="admin").exists():
    password = secrets.token_urlsafe(12)
    User.objects.create_superuser("admin", "admin@localhost", password)
    out["admin_password"] = password
import json
print("BOOTSTRAP" + json.dumps(out))
"""


def _bootstrap(host: str, port: int) -> None:
    output = _manage("shell", "-c", BOOTSTRAP, capture=True)
    import json

    line = next(x for x in output.splitlines() if x.startswith("BOOTSTRAP"))
    result = json.loads(line[len("BOOTSTRAP"):])
    base = f"http://{host}:{port}"
    if "admin_password" in result:
        _say(f"admin: {base}/admin/  user 'admin', password {result['admin_password']} (shown once)")
    else:
        _say(f"admin: {base}/admin/  (user 'admin'; reset with: .venv/bin/python manage.py changepassword admin)")
    if "key" not in result:
        _say("demo tenant 'demo' already exists; its key was shown on the first run.")
        _say("get a new key with: .venv/bin/python manage.py issue_key demo")
        return
    key = result["key"]
    print(f"""
================ demo tenant 'demo' is ready ================
API key (shown once, store it now):
  {key}

Python (official openai SDK):
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  r = client.chat.completions.create(model="local", messages=[{{"role": "user", "content": "Hi!"}}])
  print(r.choices[0].message.content)

curl:
  curl {base}/v1/chat/completions -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" \\
       -d '{{"model": "local", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
==============================================================
""", flush=True)


def server_command(host: str, port: int, workers: str = "1") -> list[str]:
    """uvicorn with uvloop and httptools, request headers bounded (llm_platform/server_protocol.py)."""
    return [PY, "-m", "uvicorn", "llm_platform.asgi:application", "--host", host, "--port", str(port),
            "--workers", workers, "--loop", "uvloop", "--http", "llm_platform.server_protocol:BoundedHttpToolsProtocol",
            "--no-access-log", "--lifespan", "on", "--timeout-graceful-shutdown", "10"]


def main() -> int:
    data = Path(os.environ.get("GW_DATA_DIR", ROOT / ".data")).resolve()
    data.mkdir(parents=True, exist_ok=True)
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    if port_open(host, port):
        _say(f"port {port} on {host} is taken; set PORT=... and run again")
        return 1
    started: list = []
    children: list[subprocess.Popen] = []
    run_env = data / "run.env"
    chosen: dict[str, str] = {}  # what a shell without these variables needs to reach this run
    stopping = False

    def stop(*_args) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if not os.environ.get("DATABASE_URL"):
            pg = EmbeddedPostgres(data / "postgres")
            _say("starting embedded PostgreSQL …")
            os.environ["DATABASE_URL"] = chosen["DATABASE_URL"] = pg.start()
            started.append(pg)
        if not os.environ.get("REDIS_URL"):
            rd = EmbeddedRedis(data / "redis")
            _say("starting embedded Redis (valkey) …")
            os.environ["REDIS_URL"] = chosen["REDIS_URL"] = rd.start()
            started.append(rd)
        if not os.environ.get("SECRET_KEY"):
            os.environ["SECRET_KEY"] = chosen["SECRET_KEY"] = _secret_key(data)
        if chosen:
            _write_run_env(run_env, chosen)
        # DEBUG stays off (unless the caller sets it): the generated secret is all it needs, and
        # no client ever sees Django's debug pages.
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llm_platform.settings")
        _say("migrating …")
        _manage("migrate", "--noinput", "-v", "0")
        _manage("load_routes", os.environ.get("GW_ROUTES_FILE", str(ROOT / "config" / "routes.yaml")))
        _bootstrap(host, port)
        workers = os.environ.get("WEB_CONCURRENCY", "1")
        children.append(subprocess.Popen(server_command(host, port, workers), cwd=ROOT))
        children.append(subprocess.Popen(
            [PY, "-m", "celery", "-A", "llm_platform", "worker", "--loglevel", "WARNING",
             "--concurrency", "2", "--without-gossip", "--without-mingle"], cwd=ROOT))
        children.append(subprocess.Popen([PY, "manage.py", "usage_writer"], cwd=ROOT))
        deadline = time.monotonic() + 30
        while not port_open(host, port) and time.monotonic() < deadline and not stopping:
            time.sleep(0.1)
        _say(f"serving on http://{host}:{port}  (Ctrl-C stops everything)")
        while not stopping:
            if any(child.poll() is not None for child in children):
                _say("a platform process exited; stopping")
                break
            time.sleep(0.3)
        return 0
    finally:
        _say("stopping …")
        _remove_run_env(run_env)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        for server in reversed(started):
            server.stop()
        _say("stopped")


if __name__ == "__main__":
    sys.exit(main())
