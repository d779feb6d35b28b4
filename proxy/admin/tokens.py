"""Admin API bearer tokens: where they come from, and the file a first start writes.

Design rule: this module uses the standard library only, because the operator CLI reads the same token
file and must start fast (no aiohttp import). Precedence, first found wins: the configured token file,
the environment variable `TURNOUT_ADMIN_TOKEN`, then `<state dir>/admin-token`, generated at first start
with mode 0600 and reused afterwards.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from proxy.errors import TurnoutError
from proxy.settings import Settings

TOKEN_ENV = "TURNOUT_ADMIN_TOKEN"
TOKEN_FILE_NAME = "admin-token"
# Actor names recorded in history: short, no spaces or punctuation that could read as part of a secret.
_ACTOR_RE = re.compile(r"[A-Za-z][A-Za-z0-9._@-]{0,62}")
DEFAULT_ACTOR = "admin"
# 32 random bytes: far beyond guessing range, and short enough to paste into a curl command.
TOKEN_BYTES = 32


class TokenFileError(TurnoutError):
    """A token file exists but cannot be used; the message names the file and the line."""


def default_state_dir() -> Path:
    """Where the default database and the generated admin token live (mirrors proxy.store.sqlite)."""
    env = os.environ.get("TURNOUT_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "turnout"


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """Lines `name:token` or one bare token (actor "admin"); blank lines and `#` comments are skipped."""
    tokens: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep or not _ACTOR_RE.fullmatch(name.strip()):
            # Only a plausible actor name before the first ':' makes a `name:token` line; otherwise the
            # whole line is one bare token, so a secret containing ':' is never cut into name and token.
            name, token = DEFAULT_ACTOR, line
        name, token = name.strip(), token.strip()
        if not name or not token:
            raise TokenFileError(f"{source}, line {lineno}: expected `name:token` or a bare token")
        if any(c.isspace() for c in token):
            raise TokenFileError(f"{source}, line {lineno}: a token may not contain spaces")
        if token in tokens:
            raise TokenFileError(f"{source}, line {lineno}: the same token is listed twice")
        tokens[token] = name
    if not tokens:
        raise TokenFileError(f"{source}: no token in the file")
    return tokens


def read_token_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TokenFileError(f"{path}: {e.strerror}") from e
    return parse_tokens(text, str(path))


def _generated(path: Path) -> dict[str, str]:
    """Read the generated token file, or create it once; O_EXCL keeps two starting processes consistent."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            # A token readable by other users is a token they hold: tighten it rather than serve with it.
            os.chmod(path, 0o600)
        return read_token_file(path)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return {token: DEFAULT_ACTOR}


def load_tokens(settings: Settings, state_dir: Path) -> tuple[dict[str, str], Path | None]:
    """(token -> actor, path of the generated token file or None when the tokens came from elsewhere)."""
    if settings.admin_token_file:
        return read_token_file(Path(settings.admin_token_file)), None
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return parse_tokens(env, TOKEN_ENV), None
    path = state_dir / TOKEN_FILE_NAME
    return _generated(path), path


def client_token(token_file: str | None = None) -> str | None:
    """The token the operator CLI sends: --token-file, then the environment, then the default file."""
    if token_file:
        return next(iter(read_token_file(Path(token_file))))
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return next(iter(parse_tokens(env, TOKEN_ENV)))
    path = default_state_dir() / TOKEN_FILE_NAME
    if path.exists():
        return next(iter(read_token_file(path)))
    return None
