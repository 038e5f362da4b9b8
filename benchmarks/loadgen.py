"""HTTP load generators: ``wrk`` (Debian's, when installed) and an asyncio one.

Both send a given list of requests in order over a fixed number of keep-alive connections
(a closed loop: each connection sends its next request when the previous answer is in),
stop after a duration or when the list runs out, and report requests per second, the p50
and p99 latency, the statuses and how many action replies said ``success``.

``wrk`` costs far less CPU per request than any Python client, which matters on a small
machine where the load generator shares the cores with the server it measures. It runs a
small Lua script (written next to the request list) that reads the list, counts the
replies, and prints one JSON line at the end. wrk only stops on time: when it runs out of
list it starts over, and the report says how many requests were repeats.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .common import Sample

_WRK_SCRIPT = r"""
-- Sends the requests listed in the file given as the first script argument (one per line:
-- METHOD<TAB>PATH<TAB>BODY), in order; counts statuses and action results.
local items = {}
local next_item = 0
requests_sent = 0
wrapped = 0
ok = 0
not_ok = 0
success = 0
other_result = 0
first_bad = ""

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    local method, path, body = line:match("^(%S+)\t(%S+)\t(.*)$")
    if body == "" then body = nil end
    items[#items + 1] = wrk.format(method, path, nil, body)
  end
  item_count = #items
end

function request()
  next_item = next_item + 1
  requests_sent = requests_sent + 1
  if next_item > #items then
    wrapped = wrapped + 1
    next_item = 1
  end
  return items[next_item]
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    not_ok = not_ok + 1
    if first_bad == "" then first_bad = status .. " " .. (body or ""):sub(1, 300) end
  end
  if body and body:find("success", 1, true) then
    success = success + 1
  elseif body and body:find('"result"', 1, true) then
    other_result = other_result + 1
  end
end

function done(summary, latency, requests)
  local t = threads[1]
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"connect":%d,' ..
    '"read":%d,"write":%d,"status":%d,"timeout":%d,"ok":%d,"not_ok":%d,"success":%d,' ..
    '"other_result":%d,"wrapped":%d,"items":%d,"sent":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout, t:get("ok"), t:get("not_ok"),
    t:get("success"), t:get("other_result"), t:get("wrapped"), t:get("item_count"),
    t:get("requests_sent")))
  io.write("FIRSTBAD " .. t:get("first_bad") .. "\n")
end
"""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes = b""


@dataclass
class LoadResult:
    sample: Sample
    tool: str
    statuses: Counter[int] = field(default_factory=Counter)
    not_ok: int = 0  # non-2xx answers
    errors: int = 0  # connection errors and timeouts
    success: int = 0  # replies whose body says "success"
    other_result: int = 0  # action replies with another result (hold-off, out-of-sync)
    wrapped: int = 0  # requests sent again after the list ran out (wrk only)
    first_bad: str = ""  # status and body of the first non-2xx answer
    sent: int = 0  # requests sent, answered or not (the first `sent` of the list, in order)
    bodies: list[bytes] = field(default_factory=list)  # answers in list order (keep=True)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_version() -> str:
    try:
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return ""
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" [")[0].removeprefix("wrk ") if first else ""


def choose(preference: str) -> str:
    """The generator to use for `preference` (auto | wrk | python)."""
    if preference == "python":
        return "python"
    if wrk_available():
        return "wrk"
    if preference == "wrk":
        raise RuntimeError("wrk is not installed (apt-get install wrk), use --loadgen python")
    return "python"


def run(
    tool: str,
    base_url: str,
    requests: list[Request],
    *,
    connections: int,
    duration: float,
    headers: dict[str, str],
    workdir: Path,
) -> LoadResult:
    if tool == "wrk":
        return run_wrk(
            base_url,
            requests,
            connections=connections,
            duration=duration,
            headers=headers,
            workdir=workdir,
        )
    return run_python(
        base_url, requests, connections=connections, duration=duration, headers=headers
    )


# wrk ----------------------------------------------------------------------------------------


def run_wrk(
    base_url: str,
    requests: list[Request],
    *,
    connections: int,
    duration: float,
    headers: dict[str, str],
    workdir: Path,
) -> LoadResult:
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "bench.lua"
    script.write_text(_WRK_SCRIPT)
    listing = workdir / "requests.tsv"
    with listing.open("w") as listing_file:
        for req in requests:
            listing_file.write(f"{req.method}\t{req.path}\t{req.body.decode()}\n")
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    for name, value in {"Content-Type": "application/json", **headers}.items():
        argv += ["-H", f"{name}: {value}"]
    argv += [base_url, "--", str(listing)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    data = json.loads(line.removeprefix("BENCH "))
    sample = Sample(
        count=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50=data["p50_us"] / 1e6,
        p99=data["p99_us"] / 1e6,
    )
    errors = data["connect"] + data["read"] + data["write"] + data["timeout"]
    bad = next((ln for ln in out.stdout.splitlines() if ln.startswith("FIRSTBAD ")), "")
    return LoadResult(
        sample=sample,
        tool="wrk",
        not_ok=data["not_ok"],
        errors=errors,
        success=data["success"],
        other_result=data["other_result"],
        wrapped=data["wrapped"],
        first_bad=bad.removeprefix("FIRSTBAD ").strip(),
        sent=data["sent"],
    )


# asyncio ------------------------------------------------------------------------------------


def _encode(req: Request, host: str, headers: dict[str, str]) -> bytes:
    lines = [f"{req.method} {req.path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if req.body or req.method in ("POST", "PUT", "PATCH"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(req.body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + req.body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> tuple[int, bytes, bool]:
    """Send one request, read its answer: status, body, whether the server keeps the line."""
    writer.write(payload)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    version, _, rest = status_line.decode("latin-1").partition(" ")
    status = int(rest[:3])
    length = 0
    keep = version == "HTTP/1.1"
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        value = value.strip()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            keep = value.lower() == "keep-alive" or (keep and value.lower() != "close")
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
    else:
        body = await reader.readexactly(length) if length else b""
    return status, body, keep


async def _load(
    base_url: str,
    requests: list[Request],
    connections: int,
    duration: float,
    headers: dict[str, str],
    keep_bodies: bool,
) -> LoadResult:
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    hostport = f"{host}:{port}"
    payloads = [_encode(r, hostport, headers) for r in requests]
    bodies: list[bytes] = [b""] * len(payloads) if keep_bodies else []
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    counts = {"success": 0, "other": 0, "errors": 0}
    first_bad: list[str] = []
    position = 0
    deadline = time.perf_counter() + duration

    async def connection() -> None:
        nonlocal position
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while position < len(payloads) and time.perf_counter() < deadline:
                index = position
                position += 1
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                began = time.perf_counter()
                try:
                    status, body, keep = await _exchange(reader, writer, payloads[index])
                except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                    counts["errors"] += 1
                    writer.close()
                    reader = writer = None
                    continue
                latencies.append(time.perf_counter() - began)
                statuses[status] += 1
                if not 200 <= status < 300 and not first_bad:
                    first_bad.append(f"{status} {body[:300].decode(errors='replace')}")
                if b"success" in body:
                    counts["success"] += 1
                elif b'"result"' in body:
                    counts["other"] += 1
                if keep_bodies:
                    bodies[index] = body
                if not keep:
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - began
    return LoadResult(
        sample=Sample(len(latencies), elapsed, latencies),
        tool="python",
        statuses=statuses,
        not_ok=sum(n for s, n in statuses.items() if not 200 <= s < 300),
        errors=counts["errors"],
        success=counts["success"],
        other_result=counts["other"],
        bodies=bodies,
        first_bad=first_bad[0] if first_bad else "",
        sent=position,
    )


def run_python(
    base_url: str,
    requests: list[Request],
    *,
    connections: int,
    duration: float,
    headers: dict[str, str],
    keep_bodies: bool = False,
) -> LoadResult:
    load = _load(base_url, requests, connections, duration, headers, keep_bodies)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(load)
    return uvloop.run(load)
