"""Loads the Lua scripts shipped in ``lua/`` and registers them on a Redis client.

Session scripts get ``lua/_prelude.lua`` put in front of them (their shared helpers and the
KEYS/ARGV layout). redis-py's ``Script`` calls by SHA and reloads the script on NOSCRIPT,
so a ``SCRIPT FLUSH`` or a Redis restart costs one extra round trip, nothing else.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.commands.core import Script

    from .connection import RedisClient

SESSION_SCRIPTS = (
    "start",
    "end",
    "add_job",
    "remove_job",
    "create",
    "replace",
    "update",
    "delete",
    "read",
    "runs",
)
# Session scripts that also get lua/_documents.lua (the helpers of whole-document writes).
DOCUMENT_SCRIPTS = ("create", "replace", "update")
JOB_SCRIPTS = ("attach_job", "detach_job")


@cache
def lua_source(name: str) -> str:
    """The full source of script `name` as sent to Redis."""
    folder = resources.files("session_worker") / "lua"
    body = (folder / f"{name}.lua").read_text(encoding="utf-8")
    if name in SESSION_SCRIPTS:
        parts = ["_prelude", "_documents"] if name in DOCUMENT_SCRIPTS else ["_prelude"]
        heads = [(folder / f"{part}.lua").read_text(encoding="utf-8") for part in parts]
        return "\n".join([*heads, body])
    return body


class Scripts:
    """Every script, registered on one client."""

    def __init__(self, client: RedisClient) -> None:
        self.by_name: dict[str, Script] = {
            name: client.register_script(lua_source(name)) for name in SESSION_SCRIPTS + JOB_SCRIPTS
        }

    def __getitem__(self, name: str) -> Script:
        return self.by_name[name]
