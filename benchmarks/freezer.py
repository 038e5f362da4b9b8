"""freezer-api 19.0.0 as the baseline: its own virtualenv from PyPI, SQLite, no keystone.

The virtualenv lives under ``var/bench/freezer-venv`` and is installed once (a stamp file
records what was installed). Every run starts from an empty SQLite database made by
``freezer-manage db sync``. Keystone's ``authtoken`` filter is left out of the paste
pipeline, so the API trusts the identity headers in :data:`IDENTITY_HEADERS`.

Two ways to serve it: its stock server (``freezer-api``: paste's HTTP/1.0 server, 10 threads,
a listen backlog of 5) and gunicorn with the ``gthread`` worker (keep-alive, a real backlog),
which is what the concurrent rows use. ``freezer_api.wsgi`` parses ``sys.argv`` with
oslo.config, which rejects gunicorn's own arguments, so gunicorn loads a two-line wrapper.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from session_worker.redis_server import HOST, free_port

VERSION = "19.0.0"
REQUIREMENTS = (f"freezer-api=={VERSION}", "gunicorn")
PROJECT = "bench"
IDENTITY_HEADERS = {
    "X-Identity-Status": "Confirmed",
    "X-User-Id": "bench",
    "X-Project-Id": PROJECT,
    "X-Roles": "admin,member",
}

_CONF = """\
[DEFAULT]
bind_host = {host}
bind_port = {port}
debug = False
use_stderr = True

[paste_deploy]
config_file = {paste}

[database]
connection = sqlite:///{db}

[oslo_policy]
enforce_scope = False
enforce_new_defaults = False
"""

# The stock freezer-paste.ini with keystone's authtoken filter taken out of the api pipeline
# (the stock unauthenticated pipeline names an app that does not exist).
_PASTE = """\
[app:api_versions]
paste.app_factory = freezer_api.api.versions:api_versions

[app:appv2]
paste.app_factory = freezer_api.service:freezer_appv2_factory

[app:healthcheck]
paste.app_factory = oslo_middleware:Healthcheck.app_factory
backends = disable_by_file
disable_by_file_path = {dir}/healthcheck_disable

[filter:context]
paste.filter_factory = freezer_api.api.common.middleware:ContextMiddleware.factory

[filter:versionsNegotiator]
paste.filter_factory = freezer_api.api.versions:VersionNegotiator.factory

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory

[composite:main]
use = egg:Paste#urlmap
/healthcheck = healthcheck
/ = api

# keystone's "authtoken" filter removed: identity comes from the X-Identity-Status,
# X-User-Id, X-Project-Id and X-Roles request headers
[pipeline:api]
pipeline = http_proxy_to_wsgi versionsNegotiator context backupapp

[composite:backupapp]
paste.composite_factory = freezer_api.service:root_app_factory
/: api_versions
/v2: appv2
"""

_WSGI = """\
# gunicorn entry: freezer_api.wsgi parses sys.argv with oslo.config, which rejects
# gunicorn's own arguments, so it gets a clean argv first.
import sys

sys.argv = [sys.argv[0], "--config-file", {conf!r}]
from freezer_api.wsgi import application  # noqa: E402,F401
"""


class FreezerSetupError(RuntimeError):
    """freezer-api could not be installed, configured or started."""


def ensure_venv(root: Path, log: Path) -> Path:
    """The virtualenv with freezer-api and gunicorn (installed on first use); its path."""
    venv = root / "freezer-venv"
    stamp = venv / ".bench-installed"
    wanted = " ".join(REQUIREMENTS)
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return venv
    with log.open("ab") as out:
        if not (venv / "bin" / "python").exists():
            _check([sys.executable, "-m", "venv", str(venv)], out, "create its virtualenv")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        _check([*pip, *REQUIREMENTS], out, f"pip install {wanted}")
    stamp.write_text(wanted + "\n")
    return venv


def _check(argv: list[str], out: BinaryIO, what: str) -> None:
    result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise FreezerSetupError(f"freezer-api: could not {what} (exit {result.returncode})")


def versions(venv: Path) -> dict[str, str]:
    """Installed versions of the packages that matter for the figures."""
    code = (
        "import importlib.metadata as m\n"
        "for n in ('freezer-api', 'gunicorn', 'falcon', 'SQLAlchemy', 'oslo.db'):\n"
        "    try: print(n, m.version(n))\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=False
    ).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


class FreezerApi:
    """One freezer-api server on a loopback port, over a fresh SQLite database."""

    def __init__(
        self,
        venv: Path,
        workdir: Path,
        *,
        server: str = "gunicorn",
        workers: int = 2,
        threads: int = 8,
    ) -> None:
        if server not in ("gunicorn", "stock"):
            raise ValueError(f"unknown freezer-api server {server!r}")
        self.venv = venv
        self.dir = workdir.resolve()
        self.server = server
        self.workers = workers
        self.threads = threads
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def description(self) -> str:
        if self.server == "stock":
            return "freezer-api (stock paste server)"
        return f"freezer-api (gunicorn {self.workers}w x {self.threads}t)"

    def _write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        db = self.dir / "freezer.db"
        for path in (db, self.dir / "freezer.db-journal"):
            path.unlink(missing_ok=True)
        paste = self.dir / "freezer-paste.ini"
        conf = self.dir / "freezer-api.conf"
        paste.write_text(_PASTE.format(dir=self.dir))
        conf.write_text(_CONF.format(host=HOST, port=self.port, paste=paste, db=db))
        (self.dir / "freezer_wsgi.py").write_text(_WSGI.format(conf=str(conf)))
        return conf

    def _db_sync(self, conf: Path) -> None:
        log = self.dir / "db-sync.log"
        with log.open("wb") as out:
            argv = [str(self.venv / "bin" / "freezer-manage"), "--config-file", str(conf)]
            subprocess.run([*argv, "db", "sync"], stdout=out, stderr=subprocess.STDOUT, check=False)
        # freezer-manage prints a failure and still exits 0: look for the table instead.
        with sqlite3.connect(self.dir / "freezer.db") as db:
            found = db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='sessions'"
            ).fetchone()
        if found is None:
            tail = log.read_text(errors="replace")[-2000:]
            raise FreezerSetupError(f"freezer-manage db sync made no sessions table:\n{tail}")

    def start(self, timeout: float = 60.0) -> Self:
        conf = self._write_config()
        self._db_sync(conf)
        bin_dir = self.venv / "bin"
        if self.server == "stock":
            argv = [str(bin_dir / "freezer-api"), "--config-file", str(conf)]
        else:
            argv = [
                str(bin_dir / "gunicorn"),
                "--chdir",
                str(self.dir),
                "--bind",
                f"{HOST}:{self.port}",
                "--workers",
                str(self.workers),
                "--threads",
                str(self.threads),
                "--backlog",
                "2048",
                "freezer_wsgi:application",
            ]
        log = (self.dir / f"{self.server}.log").open("ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FreezerSetupError(
                    f"{self.description} exited with {self.proc.returncode}; "
                    f"see {self.dir / (self.server + '.log')}"
                )
            if self._answers():
                return self
            time.sleep(0.1)
        self.stop()
        raise FreezerSetupError(f"{self.description} did not answer in {timeout:g} s")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/", timeout=1.0) as resp:
                return bool(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code == 300  # the version list answers "300 Multiple Choices"
        except OSError:
            return False

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # The stock server catches KeyboardInterrupt; gunicorn stops its workers on SIGTERM.
        sig = signal.SIGINT if self.server == "stock" else signal.SIGTERM
        try:
            os.killpg(proc.pid, sig)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
