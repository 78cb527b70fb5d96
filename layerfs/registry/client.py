"""The registry client: one ``requests.Session`` per registry, and every rule of the wire.

What it owns: choosing https or http (plain http only for loopback addresses and
registries named insecure), TLS trust (system CAs, ``--ca-cert``, a docker-style
``certs.d/<host>/`` directory with ``*.crt`` CAs and ``*.cert``/``*.key`` client
certificates), proxies from the environment (requests does it), authentication
(:mod:`layerfs.registry.auth`), redirects followed by hand so that the
Authorization header never goes to another origin, retries with exponential
backoff on connection errors, timeouts, 5xx and 429 (honouring ``Retry-After``),
and turning every failure into a :class:`RegistryError` whose message names no
secret. Blob and manifest operations are in :mod:`layerfs.registry.blobs`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import DEFAULT_POOLBLOCK, DEFAULT_POOLSIZE, HTTPAdapter

from layerfs import __version__
from layerfs.errors import AuthenticationError, RegistryError
from layerfs.model.reference import registry_api_host
from layerfs.registry.auth import Authenticator, Credentials, parse_challenges
from layerfs.registry.credentials import load_credentials
from layerfs.registry.pace import paced_connection_classes

log = logging.getLogger(__name__)

RETRY_STATUSES = (429, 500, 502, 503, 504)
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10
# A body read whole (an error, a token, an upload's answer): tokens are a few KiB.
MAX_SMALL_BODY = 4 << 20
USER_AGENT = f"layerfs/{__version__}"
_SECRET_PARAMS = ("sig", "signature", "token", "key", "credential", "auth", "password", "secret")


def default_certs_dir() -> Path:
    """Docker's per-registry certificate directory (the rootless one for normal users)."""
    if os.geteuid() == 0:
        return Path("/etc/docker/certs.d")
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "docker" / "certs.d"


@dataclass
class RegistryOptions:
    insecure_registries: tuple[str, ...] = ()
    ca_cert: str | None = None
    certs_dir: Path | None = None  # None: default_certs_dir()
    timeout: float = 30.0  # seconds to connect, and between two reads
    retries: int = 4  # further attempts after a failure that may pass
    retry_delay: float = 0.5  # first backoff; doubles each time
    max_retry_after: float = 60.0
    chunk_size: int = 32 << 20  # upload chunk (PATCH) size
    use_config: bool = True  # read ~/.docker/config.json
    extra: dict[str, Any] = field(default_factory=dict)


def split_host_port(host: str) -> tuple[str, int | None]:
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[1:end], host[end + 1 :]
        return name, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, int(port)
    return host, None


def is_loopback(host: str) -> bool:
    name, _ = split_host_port(host)
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def safe_url(url: str) -> str:
    """A URL fit for messages: no user:password, no signature or token in the query."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = [
        (k, "REDACTED" if any(s in k.lower() for s in _SECRET_PARAMS) else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe=":/"), ""))


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


class _PacedAdapter(HTTPAdapter):
    """Connections whose responses keep a pace (:mod:`layerfs.registry.pace`)."""

    def __init__(self, timeout: float, **kw: Any) -> None:
        self._pace_timeout = timeout
        super().__init__(**kw)

    def init_poolmanager(self, *args: Any, **kw: Any) -> None:
        super().init_poolmanager(*args, **kw)
        self.poolmanager.pool_classes_by_scheme = paced_connection_classes(self._pace_timeout)


class _TLSAdapter(_PacedAdapter):
    """Uses our SSL context (system CAs plus the registry's) instead of certifi's.

    The context is made on the first https request: loading the system's CAs costs
    more than a whole push to a plain-http registry on 127.0.0.1 that already has
    everything.
    """

    def __init__(
        self, make_context: Callable[[], ssl.SSLContext], timeout: float, **kw: Any
    ) -> None:
        self._make_context = make_context
        self._context: ssl.SSLContext | None = None
        self._context_lock = threading.Lock()
        self._pool_args = (
            kw.get("pool_connections", DEFAULT_POOLSIZE),
            kw.get("pool_maxsize", DEFAULT_POOLSIZE),
            kw.get("pool_block", DEFAULT_POOLBLOCK),
        )
        super().__init__(timeout, **kw)

    def _ready(self) -> ssl.SSLContext:
        with self._context_lock:
            if self._context is None:
                self._context = self._make_context()
                connections, maxsize, block = self._pool_args
                self.init_poolmanager(connections, maxsize, block=block)
            return self._context

    def init_poolmanager(self, *args: Any, **kw: Any) -> None:
        if self._context is not None:
            kw["ssl_context"] = self._context
        super().init_poolmanager(*args, **kw)

    def proxy_manager_for(self, proxy: str, **kw: Any) -> Any:
        kw["ssl_context"] = self._ready()
        return super().proxy_manager_for(proxy, **kw)

    def send(self, request: requests.PreparedRequest, *args: Any, **kw: Any) -> Any:
        self._ready()
        return super().send(request, *args, **kw)


def _no_netrc(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request  # a session auth stops requests from adding ~/.netrc credentials


class RegistryClient:
    """Talks to one registry (``docker.io``, ``host:port``); safe to use from threads."""

    def __init__(
        self,
        registry: str,
        options: RegistryOptions | None = None,
        credentials: Credentials | None = None,
        *,
        pool_size: int = 10,
    ) -> None:
        self.registry = registry
        self.host = registry_api_host(registry)
        self.options = options or RegistryOptions()
        if credentials is None and self.options.use_config:
            credentials = load_credentials(registry)
        self.credentials = credentials
        self.insecure = self._named_insecure()
        self.plain_http_allowed = self.insecure or is_loopback(self.host)
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.auth = _no_netrc
        timeout = self.options.timeout
        verified = _TLSAdapter(
            lambda: self._ssl_context(verify=True), timeout, pool_maxsize=pool_size
        )
        self.session.mount("https://", verified)
        self.session.mount("http://", _PacedAdapter(timeout, pool_maxsize=pool_size))
        if self.insecure:
            unverified = _TLSAdapter(
                lambda: self._ssl_context(verify=False), timeout, pool_maxsize=pool_size
            )
            self.session.mount(f"https://{self.host}/", unverified)
        self.auth = Authenticator(
            self.session, registry, credentials, timeout=self.options.timeout, send=self._send_token
        )
        self._base: str | None = None
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {"retries": 0, "redirects": 0}

    # -- setup ---------------------------------------------------------------------------

    def _named_insecure(self) -> bool:
        for entry in self.options.insecure_registries:
            entry = entry.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
            if entry in (self.host, self.registry):
                return True
            if "/" in entry:  # a CIDR, as dockerd accepts
                try:
                    net = ipaddress.ip_network(entry, strict=False)
                    if ipaddress.ip_address(split_host_port(self.host)[0]) in net:
                        return True
                except ValueError:
                    continue
            elif split_host_port(entry)[1] is None and split_host_port(self.host)[0] == entry:
                return True
        return False

    def _ssl_context(self, *, verify: bool) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            if self.options.ca_cert:
                context.load_verify_locations(cafile=self.options.ca_cert)
            certs = (self.options.certs_dir or default_certs_dir()) / self.host
            if certs.is_dir():
                for path in sorted(certs.iterdir()):
                    if path.suffix == ".crt":
                        context.load_verify_locations(cafile=str(path))
                    elif path.suffix == ".cert":
                        key = path.with_suffix(".key")
                        if not key.is_file():
                            raise RegistryError(
                                f"missing key {key.name} for client certificate {path}"
                            )
                        context.load_cert_chain(str(path), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise RegistryError(f"cannot load TLS certificates for {self.registry}: {exc}") from exc
        return context

    # -- the base URL ----------------------------------------------------------------------

    def base_url(self) -> str:
        """``https://host`` or, where allowed and needed, ``http://host`` (probed once)."""
        with self._lock:
            if self._base is None:
                self._base = self._probe()
            return self._base

    def _probe(self) -> str:
        schemes = ["https", "http"] if self.plain_http_allowed else ["https"]
        if self.plain_http_allowed and not self._speaks_tls():
            schemes = ["http"]
        for scheme in schemes:
            url = f"{scheme}://{self.host}/v2/"
            fallback = scheme == "https" and len(schemes) > 1
            try:
                response = self._send(
                    "GET", url, {}, what=f"ping {self.registry}", retry=not fallback
                )
            except _TLSFailure as exc:
                if fallback and not exc.certificate:
                    log.debug("https to %s failed (%s); trying http", self.host, exc.reason)
                    continue
                raise RegistryError(
                    f"TLS connection to {self.registry} failed: {exc.reason}",
                    hint="give the registry's CA with --ca-cert or in "
                    f"{(self.options.certs_dir or default_certs_dir()) / self.host}/ca.crt"
                    + ("" if self.plain_http_allowed else ", or use --insecure-registry"),
                ) from exc.__cause__  # the TLS library's own error
            except _RefusedFailure as exc:
                if fallback:
                    log.debug("https to %s refused; trying http", self.host)
                    continue
                raise exc.error from exc.__cause__
            with response:
                if response.status_code == 401:
                    self.auth.set_challenges(response.headers.get("WWW-Authenticate"))
                elif response.status_code >= 500:
                    raise self._status_error(response, f"ping {self.registry}")
            return f"{scheme}://{self.host}"
        raise RegistryError(f"cannot reach registry {self.registry}")  # pragma: no cover

    def _speaks_tls(self) -> bool:
        """Does the registry's port answer a TLS handshake? (Only where http is allowed.)

        Trying https through the session would first load the system's CAs, which costs
        more than a whole repeat push to a plain-http registry on 127.0.0.1. Nothing is
        verified or sent here: a port that answers TLS is then used with https, verified.
        """
        import socket

        name, port = split_host_port(self.host)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        timeout = self.options.timeout
        try:
            with (
                socket.create_connection((name, port or 443), timeout=timeout) as raw,
                context.wrap_socket(raw, server_hostname=name),
            ):
                return True
        except ssl.SSLError:
            return False  # something answered, not in TLS: a plain-http registry
        except OSError:
            return True  # refused or unreachable: the https attempt reports it as before

    # -- sending ---------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        scopes: Iterable[str] = (),
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        params: Mapping[str, str] | None = None,
        stream: bool = False,
        expected: tuple[int, ...] = (200,),
        what: str = "",
        retry: bool = True,
    ) -> requests.Response:
        """Send with auth, retries and redirects; raise RegistryError unless ``expected``."""
        base = self.base_url()
        url = path_or_url if "://" in path_or_url else base + path_or_url
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        what = what or f"{method} {safe_url(url)}"
        wanted = set(scopes)
        same_origin = origin(url) == origin(base)
        start = data.tell() if hasattr(data, "seek") else None
        for auth_attempt in range(2):
            sent = dict(headers or {})
            value = self.auth.header(wanted, force=auth_attempt > 0) if same_origin else None
            if value:
                sent["Authorization"] = value
            if start is not None:
                data.seek(start)
            response = self._send(
                method, url, sent, data=data, stream=stream, what=what, retry=retry
            )
            if response.status_code != 401 or auth_attempt or not same_origin:
                break
            header = response.headers.get("WWW-Authenticate")
            before = self.auth.challenge
            self.auth.set_challenges(header)
            for challenge in parse_challenges(header or ""):
                wanted.update(s for s in challenge.params.get("scope", "").split(" ") if s)
            if self.auth.challenge is None or (
                before is not None
                and before.scheme == "basic"
                and self.auth.challenge.scheme == "basic"
            ):
                break  # nothing to add: the credentials were refused
            response.close()
        if response.status_code not in expected:
            try:
                raise self._status_error(response, what)
            finally:
                response.close()
        return response

    def _send_token(self, method: str, url: str, **kw: Any) -> requests.Response:
        """For the authenticator: token requests get the same retries and redirect rule."""
        headers = kw.pop("headers", None) or {}
        kw.pop("timeout", None)
        params = kw.pop("params", None)
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        return self._send(method, url, headers, what=f"token request to {safe_url(url)}", **kw)

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        data: Any = None,
        stream: bool = False,
        what: str,
        retry: bool = True,
    ) -> requests.Response:
        """One logical request: redirects by hand, retries with backoff."""
        attempt = 0
        start = data.tell() if hasattr(data, "seek") else None
        while True:
            if start is not None:
                data.seek(start)
            delay: float
            try:
                response = self._follow(method, url, headers, data)
                if not stream:
                    self._load_body(response, what)
            except requests.exceptions.SSLError as exc:
                raise _TLSFailure(_reason(exc), _is_certificate_error(exc)) from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                refused = isinstance(exc, requests.ConnectionError) and not isinstance(
                    exc, requests.Timeout
                )
                error = self._network_error(exc, what)
                if refused and attempt == 0 and not retry:
                    raise _RefusedFailure(error) from exc
                if not retry or attempt >= self.options.retries:
                    raise error from exc
                delay = self._backoff(attempt)
                log.info("%s: %s; retrying in %.1f s", what, error.message, delay)
            else:
                if response.status_code not in RETRY_STATUSES or not retry:
                    return response
                if attempt >= self.options.retries:
                    return response
                delay = self._retry_after(response) or self._backoff(attempt)
                log.info("%s: answered %d; retrying in %.1f s", what, response.status_code, delay)
                response.close()
            attempt += 1
            self.stats["retries"] += 1
            time.sleep(delay)

    @staticmethod
    def _load_body(response: requests.Response, what: str) -> None:
        """Read a body the caller wants whole, at most MAX_SMALL_BODY bytes of it.

        requests would read any length into memory; a registry that sends more is
        refused. A read that breaks is a connection error, retried as one.
        """
        try:
            body = response.raw.read(MAX_SMALL_BODY + 1, decode_content=True) or b""
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            response.close()
            raise requests.ConnectionError(exc) from exc
        response.close()
        if len(body) > MAX_SMALL_BODY:
            raise RegistryError(
                f"{what}: the registry answered {response.status_code} with more than "
                f"{MAX_SMALL_BODY} bytes"
            )
        response._content = body  # what requests' .content and .json() then return

    def _follow(
        self, method: str, url: str, headers: Mapping[str, str], data: Any
    ) -> requests.Response:
        first = origin(url)
        sent = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            if origin(url) != first:
                sent.pop("Authorization", None)  # never to another host, scheme or port
            insecure = self.insecure and origin(url)[1:] == origin(f"https://{self.host}")[1:]
            with warnings.catch_warnings():
                if insecure:
                    warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                response = self.session.request(
                    method,
                    url,
                    headers=sent,
                    data=data,
                    stream=True,  # bodies are read here, bounded, or by the caller
                    allow_redirects=False,
                    timeout=(self.options.timeout, self.options.timeout),
                    verify=not insecure,
                )
            location = response.headers.get("Location")
            if response.status_code not in REDIRECT_STATUSES or not location:
                return response
            response.close()
            self.stats["redirects"] += 1
            url = urljoin(response.url, location)
            log.debug("redirected to %s", safe_url(url))
            if response.status_code == 303 or (
                response.status_code in (301, 302) and method == "POST"
            ):
                method, data = "GET", None
        raise RegistryError(f"too many redirects from {safe_url(url)}")

    def _backoff(self, attempt: int) -> float:
        base = self.options.retry_delay * (2**attempt)
        return float(min(base * (1 + random.random() * 0.25), 30.0))

    def _retry_after(self, response: requests.Response) -> float | None:
        value = response.headers.get("Retry-After")
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
        return max(0.0, min(seconds, self.options.max_retry_after))

    # -- errors ----------------------------------------------------------------------------

    def _network_error(self, exc: Exception, what: str) -> RegistryError:
        if isinstance(exc, requests.Timeout):
            return RegistryError(
                f"{what}: registry {self.registry} did not answer within "
                f"{self.options.timeout:g} s (timeout)",
                hint="is the registry up? --timeout SECONDS waits longer",
            )
        return RegistryError(f"{what}: cannot reach registry {self.registry}: {_reason(exc)}")

    def _status_error(self, response: requests.Response, what: str) -> RegistryError:
        status = response.status_code
        codes: list[str] = []
        messages: list[str] = []
        try:
            loaded = response._content  # the body, if _load_body read it already
            if isinstance(loaded, bytes):
                body = loaded[:65536]
            else:
                body = response.raw.read(65536, decode_content=True) if response.raw else b""
            doc = json.loads(body) if body else None
        except Exception:  # the body is only a detail of the message
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
            for err in doc["errors"]:
                if isinstance(err, dict):
                    codes.append(str(err.get("code", "")))
                    messages.append(str(err.get("message", "")).strip())
        detail = "; ".join(
            f"{c.lower().replace('_', ' ')}: {m}" if m else c.lower()
            for c, m in zip(codes, messages, strict=True)
        )
        text = f"{what}: {status} {response.reason or ''}".rstrip()
        if detail:
            text += f" ({detail})"
        if status == 401 or (status == 403 and "DENIED" in codes):
            return AuthenticationError(
                text,
                hint=f"run layerfs login {self.registry}" if not self.credentials else None,
                status=status,
                codes=tuple(codes),
            )
        return RegistryError(text, status=status, codes=tuple(codes))

    def close(self) -> None:
        self.session.close()


class _TLSFailure(RegistryError):
    def __init__(self, reason: str, certificate: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.certificate = certificate


class _RefusedFailure(RegistryError):
    def __init__(self, error: RegistryError) -> None:
        super().__init__(error.message)
        self.error = error


def _is_certificate_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        for arg in getattr(current, "args", ()):
            if isinstance(arg, BaseException) and _is_certificate_error(arg):
                return True
            if isinstance(arg, str) and "CERTIFICATE_VERIFY_FAILED" in arg:
                return True
        current = current.__cause__ or current.__context__
    return False


def _reason(exc: BaseException) -> str:
    """A short cause for a message: the innermost error's text, without URLs."""
    current: BaseException = exc
    for _ in range(6):
        inner = next(
            (a for a in getattr(current, "args", ()) if isinstance(a, BaseException)), None
        )
        nested = getattr(current, "reason", None)
        nxt = inner or (nested if isinstance(nested, BaseException) else None)
        if nxt is None:
            break
        current = nxt
    text = str(current)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "Temporary failure in name resolution" in text:
        return "unknown host"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "certificate verify failed: " + text.split("certificate verify failed:")[-1].strip(
            " )'\""
        )
    if "timed out" in text.lower():
        return "timed out"
    text = text.split(": ", 1)[-1] if "<" in text else text
    return text[:200]
