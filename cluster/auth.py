"""Ray token authentication: write a cluster's token, find the token a client should send.

Ray (2.60) turns token auth on with RAY_AUTH_MODE=token in every process of the cluster and
reads the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
HTTP clients (the Jobs API) send `Authorization: Bearer <token>`. We build that header
ourselves instead of relying on Ray's process-wide token cache, so one process can talk to
clusters with different tokens.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


class MissingToken(ValueError):
    """A token was asked for (explicitly) but cannot be read."""


def write_token(path: Path) -> Path:
    """Create `path` (mode 0600) holding a fresh random token; refuses to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def client_token(env: Mapping[str, str] | None = None) -> str | None:
    """The token this client should send, or None when token auth is not asked for.

    Asked for = RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is set, or RAY_AUTH_MODE=token (then the
    default ~/.ray/auth_token is read too). The default file alone is not sent anywhere.
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if not path and env.get("RAY_AUTH_MODE", "").lower() == "token":
        path = str(DEFAULT_TOKEN_FILE)
    if not path:
        return None
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as err:
        raise MissingToken(f"cannot read the Ray auth token file {path}: {err.strerror}") from None
    if not token:
        raise MissingToken(f"the Ray auth token file {path} is empty")
    return token


def auth_headers(env: Mapping[str, str] | None = None) -> dict[str, str]:
    token = client_token(env)
    return {"Authorization": f"Bearer {token}"} if token else {}
