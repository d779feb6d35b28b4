"""Admin tokens: sources, the generated 0600 file, constant-time checks, the public allow-list."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.admin.auth import authorize, load_tokens, public_paths
from proxy.admin.tokens import TokenFileError, client_token, parse_tokens
from proxy.settings import Settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_generates_a_0600_token_file_and_reuses_it(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    tokens, path = load_tokens(Settings(), state_dir)
    assert path == state_dir / "admin-token"
    assert mode(path) == 0o600
    ((token, actor),) = tokens.items()
    assert actor == "admin"
    assert len(token) >= 40
    assert path.read_text() == token + "\n"
    again, path2 = load_tokens(Settings(), state_dir)
    assert (again, path2) == ({token: "admin"}, path)


def test_a_loosened_generated_file_is_tightened_back(tmp_path: Path) -> None:
    tokens, path = load_tokens(Settings(), tmp_path)
    assert path is not None
    os.chmod(path, 0o644)
    again, _ = load_tokens(Settings(), tmp_path)
    assert (again, mode(path)) == (tokens, 0o600)


def test_token_file_setting_wins_with_named_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "tokens"
    f.write_text("# operators\nalice: tok-a\n\nci:tok-c\n")
    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "from-env")
    tokens, path = load_tokens(Settings(admin_token_file=str(f)), tmp_path / "state")
    assert (tokens, path) == ({"tok-a": "alice", "tok-c": "ci"}, None)
    assert not (tmp_path / "state").exists()


def test_environment_token_when_no_file_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "s3cret")
    assert load_tokens(Settings(), tmp_path) == ({"s3cret": "admin"}, None)


@pytest.mark.parametrize(("text", "message"), [
    ("", "f: no token in the file"),
    ("# only a comment\n", "f: no token in the file"),
    ("alice:\n", "f, line 1: expected `name:token` or a bare token"),
    ("a:x y\n", "f, line 1: a token may not contain spaces"),
    ("a:t\nb:t\n", "f, line 2: the same token is listed twice"),
])
def test_bad_token_files_are_refused(text: str, message: str) -> None:
    with pytest.raises(TokenFileError) as e:
        parse_tokens(text, "f")
    assert str(e.value) == message


def test_missing_token_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="nope: No such file or directory"):
        load_tokens(Settings(admin_token_file=str(tmp_path / "nope")), tmp_path)


def test_cli_token_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "sd"
    monkeypatch.setenv("TURNOUT_STATE_DIR", str(state_dir))
    assert client_token() is None
    tokens, _ = load_tokens(Settings(), state_dir)
    assert client_token() == next(iter(tokens))
    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", "ops:from-env")
    assert client_token() == "from-env"
    f = tmp_path / "mine"
    f.write_text("mine-token\n")
    assert client_token(str(f)) == "mine-token"


@pytest.mark.parametrize(("header", "actor"), [
    ("Bearer tok-a", "alice"),
    ("bearer tok-b", "bob"),
    ("Bearer  tok-a ", "alice"),
    ("Bearer tok-", None),
    ("Bearer tok-ab", None),
    ("Basic tok-a", None),
    ("tok-a", None),
    ("Bearer ", None),
    (None, None),
])
def test_authorize(header: str | None, actor: str | None) -> None:
    assert authorize({"tok-a": "alice", "tok-b": "bob"}, header) == actor


def test_no_tokens_means_nobody_gets_in() -> None:
    assert authorize({}, "Bearer anything") is None


def test_public_paths_follow_metrics_auth() -> None:
    assert public_paths(Settings()) == {"/healthz", "/readyz", "/metrics"}
    assert public_paths(Settings(metrics_auth=True)) == {"/healthz", "/readyz"}


def test_a_bare_token_containing_a_colon_is_not_cut_into_name_and_token() -> None:
    assert parse_tokens("9f/Qx+z:Kd2\n", "f") == {"9f/Qx+z:Kd2": "admin"}
    assert parse_tokens("ci-bot:Kd2:more\n", "f") == {"Kd2:more": "ci-bot"}
