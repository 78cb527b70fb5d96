"""Registry authentication: challenges, Basic credentials and Bearer tokens.

A registry answers 401 with ``WWW-Authenticate`` (FORMATS §8.3). Basic means
resending with the user's credentials. Bearer means asking the realm for a
token for the scopes the request needs (``repository:<name>:pull,push``),
with the credentials if there are any (an identity token is exchanged by the
OAuth POST), anonymously otherwise. Tokens are cached per scope set until
shortly before they expire. Header values never reach a log or an error
message.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import requests

from layerfs.errors import AuthenticationError, RegistryError

log = logging.getLogger(__name__)

_TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
MIN_TOKEN_LIFETIME = 60  # seconds; FORMATS §8.3: the default and the floor
_EARLY = 5  # renew a token this many seconds before it expires
CLIENT_ID = "layerfs"


@dataclass
class Challenge:
    scheme: str  # lower case: "basic", "bearer"
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (RFC 7235); several challenges may share it.

    Commas inside quoted values (``scope="repository:a:pull,push"``) do not split.
    """
    challenges: list[Challenge] = []
    pos, n = 0, len(header)
    current: Challenge | None = None
    while pos < n:
        while pos < n and header[pos] in " \t,":
            pos += 1
        m = _TOKEN_CHARS.match(header, pos)
        if not m:
            pos += 1  # skip a stray character
            continue
        name, pos = m.group(0), m.end()
        look = pos
        while look < n and header[look] in " \t":
            look += 1
        if look < n and header[look] == "=" and current is not None:
            pos = look + 1
            while pos < n and header[pos] in " \t":
                pos += 1
            value, pos = _read_value(header, pos)
            current.params[name.lower()] = value
            continue
        current = Challenge(name.lower())
        challenges.append(current)
        pos = look
    return challenges


def _read_value(text: str, pos: int) -> tuple[str, int]:
    if pos < len(text) and text[pos] == '"':
        out = []
        pos += 1
        while pos < len(text):
            ch = text[pos]
            if ch == "\\" and pos + 1 < len(text):
                out.append(text[pos + 1])
                pos += 2
                continue
            if ch == '"':
                return "".join(out), pos + 1
            out.append(ch)
            pos += 1
        return "".join(out), pos
    m = _TOKEN_CHARS.match(text, pos)
    if not m:
        return "", pos
    return m.group(0), m.end()


@dataclass
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth refresh token stored by login

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    @property
    def empty(self) -> bool:
        return not (self.username or self.identity_token)


@dataclass
class Token:
    value: str
    expires_at: float
    refresh_token: str = ""


def repository_scope(name: str, actions: str) -> str:
    return f"repository:{name}:{actions}"


class Authenticator:
    """Per registry: remembers its challenge and the tokens it was granted (thread-safe)."""

    def __init__(
        self,
        session: requests.Session,
        registry: str,
        credentials: Credentials | None,
        *,
        timeout: float,
        send: Callable[..., requests.Response] | None = None,
    ) -> None:
        self.session = session
        self.registry = registry
        self.credentials = credentials
        self.timeout = timeout
        self.challenge: Challenge | None = None
        self._tokens: dict[frozenset[str], Token] = {}
        self._lock = threading.Lock()
        self._send = send
        self.refresh_token = ""  # set when the realm hands one out (login)

    def set_challenges(self, header: str | None) -> None:
        """Record the challenge of a 401 (Bearer preferred over Basic)."""
        found = parse_challenges(header or "")
        by_scheme = {c.scheme: c for c in found}
        chosen = by_scheme.get("bearer") or by_scheme.get("basic")
        if chosen is not None:
            self.challenge = chosen

    def header(self, scopes: Iterable[str], *, force: bool = False) -> str | None:
        """The Authorization value for a request needing ``scopes`` (None: send none)."""
        challenge = self.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if self.credentials is None or not self.credentials.username:
                return None
            return self.credentials.basic()
        if challenge.scheme != "bearer":
            return None
        key = frozenset(scopes)
        with self._lock:
            token = self._tokens.get(key)
            if token is not None and not force and token.expires_at - _EARLY > time.time():
                return "Bearer " + token.value
            token = self._fetch_token(challenge, sorted(key))
            self._tokens[key] = token
            return "Bearer " + token.value

    def _fetch_token(self, challenge: Challenge, scopes: list[str]) -> Token:
        realm = challenge.params.get("realm")
        if not realm or not realm.lower().startswith(("http://", "https://")):
            raise AuthenticationError(
                f"registry {self.registry} asks for a token but names no usable realm"
            )
        service = challenge.params.get("service", "")
        creds = self.credentials
        if creds is not None and creds.identity_token:
            token = self._oauth(realm, service, scopes, creds.identity_token)
            if token is not None:
                return token
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        params += [("scope", s) for s in scopes]
        headers = {}
        if creds is not None and creds.username:
            headers["Authorization"] = creds.basic()
            params += [("offline_token", "true"), ("client_id", CLIENT_ID)]
        response = self._request("GET", realm, params=params, headers=headers)
        return self._token_from(response, realm)

    def _oauth(self, realm: str, service: str, scopes: list[str], refresh: str) -> Token | None:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "service": service,
            "client_id": CLIENT_ID,
            "scope": " ".join(scopes),
        }
        response = self._request("POST", realm, data=form)
        if response.status_code in (404, 405):
            response.close()
            return None  # no OAuth endpoint: fall back to GET
        return self._token_from(response, realm)

    def _request(self, method: str, url: str, **kw: Any) -> requests.Response:
        try:
            if self._send is not None:
                response = self._send(method, url, timeout=self.timeout, **kw)
            else:
                response = self.session.request(
                    method, url, timeout=self.timeout, allow_redirects=True, **kw
                )
        except requests.RequestException as exc:
            raise RegistryError(
                f"cannot get a token from {_host_of(url)} for {self.registry}: {type(exc).__name__}"
            ) from exc
        return response

    def _token_from(self, response: requests.Response, realm: str) -> Token:
        with response:
            if response.status_code in (401, 403):
                raise AuthenticationError(
                    f"authentication to {self.registry} failed: the token server "
                    f"{_host_of(realm)} answered {response.status_code}"
                    + (" (incorrect username or password?)" if self.credentials else ""),
                    hint=None if self.credentials else f"run layerfs login {self.registry}",
                    status=response.status_code,
                )
            if response.status_code != 200:
                raise RegistryError(
                    f"the token server {_host_of(realm)} answered {response.status_code}",
                    status=response.status_code,
                )
            try:
                doc = json.loads(response.content)
            except ValueError as exc:
                raise RegistryError(
                    f"the token server {_host_of(realm)} answered something that is not JSON"
                ) from exc
        if not isinstance(doc, dict):
            raise RegistryError(f"the token server {_host_of(realm)} answered malformed JSON")
        value = doc.get("token") or doc.get("access_token")
        if not isinstance(value, str) or not value:
            raise RegistryError(f"the token server {_host_of(realm)} returned no token")
        lifetime = doc.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime < MIN_TOKEN_LIFETIME:
            lifetime = MIN_TOKEN_LIFETIME
        refresh = doc.get("refresh_token")
        if isinstance(refresh, str) and refresh:
            self.refresh_token = refresh
        return Token(
            value, time.time() + float(lifetime), refresh if isinstance(refresh, str) else ""
        )

    def forget(self, scopes: Iterable[str]) -> None:
        with self._lock:
            self._tokens.pop(frozenset(scopes), None)


def _host_of(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else "?"
