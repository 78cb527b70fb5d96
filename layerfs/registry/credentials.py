"""Credentials in ``~/.docker/config.json``, read and written the way docker does.

(FORMATS §8.5.) The directory is ``$DOCKER_CONFIG`` or ``~/.docker``. Per
registry the helper is ``credHelpers[host]``, else ``credsStore``, else the
file's own ``auths`` entry (``auth`` = base64 of ``user:password``, or
``username``/``password``, plus ``identitytoken``). Helpers are the
``docker-credential-<name>`` programs with their get/store/erase protocol.
``DOCKER_AUTH_CONFIG`` (the same JSON) is consulted first when reading. The
file is rewritten through a temporary file and a rename: a new file gets mode
0600, an existing one keeps its mode. Unknown keys are preserved.

The file or its directory may be a symlink (dotfile managers make them), but
only one its user or root made: a symlink owned by anyone else is someone
else's way of pointing this process, maybe root, at a file of their choosing,
so it is neither read nor written through (Docker follows any). What is read
must be a regular file of at most 16 MiB.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from layerfs.errors import AuthenticationError, LayerfsError, UsageError
from layerfs.model.reference import is_docker_hub
from layerfs.registry.auth import Credentials

log = logging.getLogger(__name__)

HUB_AUTH_KEY = "https://index.docker.io/v1/"
TOKEN_USERNAME = "<token>"  # helper output: Secret is an identity token
MAX_CONFIG_FILE = 16 << 20


class CredentialsError(AuthenticationError):
    """A credential helper failed or the config file cannot be read or written."""


def config_dir() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path.home() / ".docker"


def config_path() -> Path:
    return config_dir() / "config.json"


def auth_key(registry: str) -> str:
    """The key a registry has in ``auths`` and for helpers: Docker Hub's is a URL."""
    if is_docker_hub(registry):
        return HUB_AUTH_KEY
    return registry


def _host_of_key(key: str) -> str:
    """``https://host:5000/v1/`` → ``host:5000``; a bare ``host:5000`` stays."""
    if "://" in key:
        return urlsplit(key).netloc
    return key.split("/", 1)[0]


def check_own_symlinks(path: Path) -> None:
    """Refuse ``path`` if it or its directory is a symlink owned by someone else."""
    for candidate in (path.parent, path):
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CredentialsError(f"cannot read {candidate}: {exc.strerror}") from exc
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (os.geteuid(), 0):
            raise CredentialsError(
                f"{candidate} is a symlink owned by uid {st.st_uid}, not by this user "
                "or root: not followed"
            )


def read_config_file(path: Path) -> bytes:
    """The bytes of a credentials file; b"" if it does not exist."""
    check_own_symlinks(path)
    try:
        # O_NONBLOCK: a FIFO planted there must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CredentialsError(f"{path} is not a regular file")
        data = handle.read(MAX_CONFIG_FILE + 1)
    if len(data) > MAX_CONFIG_FILE:
        raise CredentialsError(f"{path} is larger than {MAX_CONFIG_FILE} bytes")
    return data


def _decode_auth(value: str, where: str) -> tuple[str, str]:
    try:
        text = base64.b64decode(value, validate=False).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise CredentialsError(f"{where}: 'auth' is not valid base64: {exc}") from exc
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise CredentialsError(f"{where}: 'auth' is not base64 of user:password")
    return user, password.rstrip("\x00")


class DockerConfig:
    """One ``config.json``: lookups, and store/erase through the right helper."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else config_path()
        self.doc: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        data = read_config_file(self.path)
        if not data.strip():
            return {}
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise CredentialsError(f"{self.path} is not valid JSON: {exc}") from exc
        except RecursionError:
            raise CredentialsError(f"{self.path}: JSON nested too deeply") from None
        if not isinstance(doc, dict):
            raise CredentialsError(f"{self.path} is not a JSON object")
        return doc

    # -- reading -------------------------------------------------------------------------

    def helper_for(self, registry: str) -> str | None:
        helpers = self.doc.get("credHelpers")
        host = _host_of_key(auth_key(registry))
        if isinstance(helpers, dict):
            for key in (auth_key(registry), registry, host):
                if isinstance(helpers.get(key), str) and helpers[key]:
                    return str(helpers[key])
        store = self.doc.get("credsStore")
        return store if isinstance(store, str) and store else None

    def get(self, registry: str) -> Credentials | None:
        """The credentials for ``registry`` (a host[:port] or ``docker.io``), or None."""
        env = os.environ.get("DOCKER_AUTH_CONFIG")
        if env:
            try:
                env_doc = json.loads(env)
            except (ValueError, RecursionError):
                log.warning("DOCKER_AUTH_CONFIG is not valid JSON; ignored")
            else:
                if isinstance(env_doc, dict):
                    found = _from_auths(env_doc.get("auths"), registry, "DOCKER_AUTH_CONFIG")
                    if found is not None:
                        return found
        helper = self.helper_for(registry)
        if helper:
            return helper_get(helper, auth_key(registry))
        return _from_auths(self.doc.get("auths"), registry, str(self.path))

    # -- writing -------------------------------------------------------------------------

    def store(self, registry: str, creds: Credentials) -> None:
        key = auth_key(registry)
        helper = self.helper_for(registry)
        auths = self.doc.setdefault("auths", {})
        if not isinstance(auths, dict):
            raise CredentialsError(f"{self.path}: 'auths' is not an object")
        if helper:
            if creds.identity_token:
                helper_store(helper, key, TOKEN_USERNAME, creds.identity_token)
            else:
                helper_store(helper, key, creds.username, creds.password)
            auths[key] = {}  # what docker's native store writes: the key, no secret
        else:
            entry: dict[str, Any] = {
                "auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            }
            if creds.identity_token:
                entry = {
                    "auth": base64.b64encode(f"{creds.username}:".encode()).decode(),
                    "identitytoken": creds.identity_token,
                }
            auths[key] = entry
        self.save()

    def erase(self, registry: str) -> bool:
        """Remove stored credentials; True if there were any."""
        key = auth_key(registry)
        found = False
        helper = self.helper_for(registry)
        if helper:
            try:
                found = helper_erase(helper, key)
            except CredentialsError as exc:
                log.warning("%s", exc)
        auths = self.doc.get("auths")
        if isinstance(auths, dict):
            for k in list(auths):
                if k == key or _host_of_key(k) == _host_of_key(key):
                    del auths[k]
                    found = True
        if found:
            self.save()
        return found

    def save(self) -> None:
        path = self.path
        check_own_symlinks(path)
        if path.is_symlink():
            path = path.parent / os.readlink(path)
            check_own_symlinks(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps(self.doc, indent="\t").encode() + b"\n"
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o600
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.json.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


def _from_auths(auths: Any, registry: str, where: str) -> Credentials | None:
    if not isinstance(auths, dict):
        return None
    key = auth_key(registry)
    entry = auths.get(key)
    if entry is None:
        wanted = _host_of_key(key)
        for k, v in auths.items():
            if _host_of_key(k) == wanted:
                entry = v
                break
    if not isinstance(entry, dict):
        return None
    user = entry.get("username") or ""
    password = entry.get("password") or ""
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        user, password = _decode_auth(entry["auth"], f"{where}: auths[{key!r}]")
    token = entry.get("identitytoken") or ""
    creds = Credentials(str(user), str(password), str(token))
    return None if creds.empty else creds


# -- credential helpers ----------------------------------------------------------------


def _run_helper(name: str, action: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    program = f"docker-credential-{name}"
    try:
        return subprocess.run(
            [program, action], input=data, capture_output=True, timeout=60, check=False
        )
    except FileNotFoundError:
        raise CredentialsError(
            f"credential helper {program} is not installed (configured in {config_path()})"
        ) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CredentialsError(f"credential helper {program} {action} failed: {exc}") from exc


def _not_found(result: subprocess.CompletedProcess[bytes]) -> bool:
    text = (result.stdout + result.stderr).decode(errors="replace").lower()
    return "credentials not found" in text


def helper_get(name: str, server: str) -> Credentials | None:
    result = _run_helper(name, "get", server.encode())
    if result.returncode != 0:
        if _not_found(result):
            return None
        raise CredentialsError(
            f"credential helper docker-credential-{name} get failed (exit {result.returncode})"
        )
    try:
        doc = json.loads(result.stdout)
        user, secret = str(doc.get("Username", "")), str(doc.get("Secret", ""))
    except (ValueError, AttributeError, RecursionError) as exc:
        raise CredentialsError(
            f"credential helper docker-credential-{name} printed malformed JSON"
        ) from exc
    if user == TOKEN_USERNAME:
        return Credentials("", "", secret)
    creds = Credentials(user, secret)
    return None if creds.empty else creds


def helper_store(name: str, server: str, username: str, secret: str) -> None:
    payload = json.dumps({"ServerURL": server, "Username": username, "Secret": secret}).encode()
    result = _run_helper(name, "store", payload)
    if result.returncode != 0:
        raise CredentialsError(
            f"credential helper docker-credential-{name} store failed (exit {result.returncode})"
        )


def helper_erase(name: str, server: str) -> bool:
    result = _run_helper(name, "erase", server.encode())
    if result.returncode != 0:
        if _not_found(result):
            return False
        raise CredentialsError(
            f"credential helper docker-credential-{name} erase failed (exit {result.returncode})"
        )
    return True


def load_credentials(registry: str) -> Credentials | None:
    """Credentials for ``registry`` from the user's docker config; errors become warnings."""
    try:
        return DockerConfig().get(registry)
    except LayerfsError as exc:
        log.warning("%s; continuing without credentials", exc)
        return None


def check_username(username: str) -> str:
    if not username or ":" in username:
        raise UsageError("a username is required and must not contain ':'")
    return username
