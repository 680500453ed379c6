"""The README's first command: embedded PostgreSQL and Redis, a demo key, chat, Ctrl-C, rerun."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest

from llm_platform.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


class Run:
    def __init__(self, data: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY")}
        env.update({"GW_DATA_DIR": str(data), "PORT": str(port), "GW_LOCAL_TOKENS_PER_SECOND": "0"})
        self.proc = subprocess.Popen([sys.executable, "-m", "llm_platform.up"], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, "run command exited early:\n" + "".join(self.seen)
                continue
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(self.seen))

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=60)
        self.seen.extend(self.lines.queue)
        return code


def test_run_command_serves_a_demo_key_and_restarts_cleanly():
    data = ROOT / ".data" / f"test-run-{uuid.uuid4().hex[:8]}"
    port = free_port()
    try:
        first = Run(data, port)
        key = first.wait_for(r"^\s+sk-gw-").strip()
        first.wait_for("serving on")
        text = "".join(first.seen)
        assert "from openai import OpenAI" in text and "curl http://127.0.0.1" in text
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "Hi!"}])
        assert reply.choices[0].message.content.endswith("You said: Hi!")
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "Hi!"}], stream=True) if c.choices)
        assert streamed == reply.choices[0].message.content
        # DEBUG is off: an unknown /v1/ URL is OpenAI's JSON error, not Django's debug page.
        with pytest.raises(openai.NotFoundError) as missing:
            client.get("/no-such-endpoint", cast_to=object)
        assert missing.value.body == {"message": "Unknown request URL: /v1/no-such-endpoint. Please check the URL.",
                                      "type": "invalid_request_error", "param": None, "code": "unknown_url"}
        with pytest.raises(urllib.error.HTTPError) as page:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/no-such-page", timeout=10)
        assert page.value.code == 404 and b"URLconf" not in page.value.read()  # no debug page

        # The README's next command, typed in another shell while the run command is up.
        issued = manage_in_a_fresh_shell(data, "issue_key", "demo")
        assert issued.returncode == 0, issued.stderr
        other_key = issued.stdout.split()[-1]
        assert other_key.startswith("sk-gw-") and other_key != key
        other = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=other_key, max_retries=0)
        assert other.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "Hi!"}]).choices[0].message.content

        assert first.interrupt() == 0
        assert "stopped" in "".join(first.seen)
        assert not (data / "run.env").exists()
        refused = manage_in_a_fresh_shell(data, "issue_key", "demo")
        assert refused.returncode != 0 and "scripts/run" in refused.stderr

        second = Run(data, port)
        second.wait_for("already exists")
        second.wait_for("serving on")
        assert not any(re.match(r"^\s+sk-gw-", line) for line in second.seen)
        assert "issue_key demo" in "".join(second.seen)
        again = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert again.models.list().data[0].id
        assert second.interrupt() == 0
    finally:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(relocated_postgres(data), ignore_errors=True)


def manage_in_a_fresh_shell(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python manage.py ...` with none of the run command's variables (DATABASE_URL, REDIS_URL,
    SECRET_KEY, DEBUG): only PATH, HOME and this test's data folder (the default is `.data`)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
           "GW_DATA_DIR": str(data)}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=60)


def test_a_run_env_file_whose_run_command_died_is_ignored(tmp_path, monkeypatch):
    from llm_platform.settings import load_run_env

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / "run.env"
    path.write_text(f"GW_RUN_PID={gone.pid}\nREDIS_URL=redis://127.0.0.1:1/0\n")
    monkeypatch.setenv("REDIS_URL", "")  # unset, as far as settings go; restored afterwards
    assert load_run_env(path) is False
    assert os.environ["REDIS_URL"] == ""


def test_a_variable_set_in_the_environment_wins_over_the_run_env_file(tmp_path, monkeypatch):
    from llm_platform.settings import load_run_env

    path = tmp_path / "run.env"
    path.write_text(f"# comment\nGW_RUN_PID={os.getpid()}\nREDIS_URL=redis://127.0.0.1:1/0\n"
                    "GW_TEST_RUN_ENV_ONLY=from-file\n")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:2/0")
    monkeypatch.setenv("GW_TEST_RUN_ENV_ONLY", "")  # unset, as far as settings go; removed afterwards
    assert load_run_env(path) is True
    assert os.environ["REDIS_URL"] == "redis://127.0.0.1:2/0"
    assert os.environ["GW_TEST_RUN_ENV_ONLY"] == "from-file"


def relocated_postgres(data: Path) -> Path:
    """Where the run command puts PostgreSQL when the checkout's folders are private (root)."""
    import hashlib
    import tempfile

    digest = hashlib.sha1(str((data / "postgres").resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"llm-platform-pg-{digest}"
