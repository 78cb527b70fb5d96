"""pull, push, login, logout: the registry commands, with docker's output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerfs.cli.common import open_store
from layerfs.errors import UsageError
from layerfs.progress import Progress

if TYPE_CHECKING:
    from layerfs.registry.client import RegistryOptions

# The registry client (and requests under it) is imported by the commands that use it,
# so that every other command starts without loading an HTTP stack.


class DockerProgress(Progress):
    """Progress in docker's words: the pipeline's statuses renamed per direction."""

    def __init__(self, words: dict[str, str], **kw: Any) -> None:
        super().__init__(**kw)
        self.words = words
        self.notes: dict[str, str] = {}

    def note(self, key: str, status: str) -> None:
        """A status to show instead of "Already exists" (e.g. "Mounted from x")."""
        self.notes[key] = status

    def start(self, key: str, label: str, total: int | None = None, status: str = "") -> None:
        if status == "Already exists" and key in self.notes:
            status = self.notes[key]
        super().start(key, label, total, self.words.get(status, status))

    def status(self, key: str, status: str) -> None:
        word = self.words.get(status, status)
        if word:
            super().status(key, word)


PULL_WORDS = {
    "Waiting": "Pulling fs layer",
    "Waiting for another process": "Waiting",
    "Copying": "",
    "Complete": "Pull complete",
}
PUSH_WORDS = {
    "Waiting": "Preparing",
    "Copying": "Pushing",
    "Complete": "Pushed",
    "Already exists": "Layer already exists",
}


def _progress(args: argparse.Namespace, words: dict[str, str]) -> DockerProgress:
    quiet = bool(getattr(args, "global_quiet", False) or args.quiet)
    progress = DockerProgress(words, quiet=quiet)
    track = getattr(progress, "track_total", None)
    if track is not None and progress.tty:
        track("Total")
    return progress


def _add_connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry connection")
    g.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="allow plain http and unverified TLS for this registry (repeatable; "
        "loopback addresses may always use plain http)",
    )
    g.add_argument("--ca-cert", metavar="FILE", help="trust this CA certificate (PEM) as well")
    g.add_argument(
        "--certs-dir",
        metavar="DIR",
        help="per-registry certificates, DIR/<host[:port]>/{ca.crt,client.cert,client.key} "
        "(default /etc/docker/certs.d, like docker)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up on a registry that does not answer for this long (default 30)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=4,
        metavar="N",
        help="retry a failed request or a dropped download N times, with backoff (default 4)",
    )


def _options(args: argparse.Namespace) -> RegistryOptions:
    from layerfs.registry.client import RegistryOptions

    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if args.retries < 0:
        raise UsageError("--retries must not be negative")
    return RegistryOptions(
        insecure_registries=tuple(args.insecure_registry),
        ca_cert=args.ca_cert,
        certs_dir=Path(args.certs_dir) if args.certs_dir else None,
        timeout=args.timeout,
        retries=args.retries,
    )


def register(subparsers: Any) -> None:
    _add_pull(subparsers)
    _add_push(subparsers)
    _add_login(subparsers)
    _add_logout(subparsers)


def _add_max_concurrent(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=3,
        metavar="N",
        help=f"{verb} up to N layers at once (default 3)",
    )


def _add_pull(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pull",
        help="pull an image from a registry",
        description=(
            "Download an image from a registry (API v2) into the store, like docker pull. "
            "Layers already in the store are skipped; the others are downloaded in parallel, "
            "resumed after a dropped connection, and verified before anything is published."
        ),
    )
    p.add_argument("name", metavar="NAME[:TAG|@DIGEST]")
    p.add_argument("-a", "--all-tags", action="store_true", help="pull every tag of the repository")
    p.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="the platform to pick from a multi-platform image (default: this machine's)",
    )
    _add_max_concurrent(p, "download")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image reference")
    _add_connection_options(p)
    p.set_defaults(handler=cmd_pull)


def _add_push(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "push",
        help="push an image to a registry",
        description=(
            "Upload an image to a registry, like docker push. Layers are gzipped at push time; "
            "their compressed digests are kept, so a layer is never compressed or uploaded "
            "twice, and a layer in another repository of the same registry is mounted."
        ),
    )
    p.add_argument("name", metavar="NAME[:TAG]")
    p.add_argument("-a", "--all-tags", action="store_true", help="push every tag of the repository")
    p.add_argument(
        "--format",
        choices=["docker", "oci"],
        default="docker",
        help="manifest format: Docker schema2 (default) or OCI",
    )
    _add_max_concurrent(p, "upload")
    p.add_argument(
        "--compression-level",
        type=int,
        choices=range(0, 10),
        default=None,
        metavar="0-9",
        help="gzip level for layers compressed now (default 1: fast)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    _add_connection_options(p)
    p.set_defaults(handler=cmd_push)


def _add_login(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "login",
        help="log in to a registry",
        description=(
            "Check credentials against a registry and store them in ~/.docker/config.json "
            "($DOCKER_CONFIG), or in the credential helper it names, like docker login."
        ),
    )
    p.add_argument("registry", metavar="REGISTRY")
    p.add_argument("-u", "--username", metavar="USER")
    p.add_argument("-p", "--password", metavar="PASSWORD", help="insecure: prefer --password-stdin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    _add_connection_options(p)
    p.set_defaults(handler=cmd_login)


def _add_logout(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "logout",
        help="log out from a registry",
        description="Remove stored credentials for a registry, like docker logout.",
    )
    p.add_argument("registry", metavar="REGISTRY")
    p.set_defaults(handler=cmd_logout)


def cmd_pull(args: argparse.Namespace) -> int:
    from layerfs.model.platform import Platform
    from layerfs.model.reference import Reference, remote_name
    from layerfs.transfer import pull

    if args.max_concurrent < 1:
        raise UsageError("--max-concurrent must be at least 1")
    options = _options(args)
    platform = Platform.parse(args.platform) if args.platform else None
    if args.all_tags:
        from layerfs.registry.tags import repository_tags

        repository = Reference.parse(args.name, default_tag=None).repository
        tags = repository_tags(args.name, options)
        if not tags:
            raise UsageError(f"no tags to pull in {repository}")
        names = [f"{repository}:{tag}" for tag in tags]
    else:
        names = [args.name]
    store = open_store(args)
    quiet = bool(getattr(args, "global_quiet", False) or args.quiet)
    reference = Reference.parse(args.name)
    if not quiet and not args.all_tags and Reference.parse(args.name, default_tag=None).ref == "":
        print(f"Using default tag: {reference.tag}")
    downloaded = False
    for name in names:
        wanted = Reference.parse(name)
        if not quiet:
            print(f"{wanted.ref}: Pulling from {remote_name(wanted.repository)}", flush=True)
        progress = _progress(args, PULL_WORDS)
        try:
            result = pull(
                store,
                name,
                options=options,
                platform=platform,
                max_concurrent=args.max_concurrent,
                progress=progress,
            )
        finally:
            progress.close()
        downloaded = downloaded or bool(result.layers_copied)
        if not quiet:
            print(f"Digest: {result.digest}", flush=True)
    shown = reference.repository if args.all_tags else str(result.reference)
    if quiet:
        print(shown)
        return 0
    if downloaded:
        print(f"Status: Downloaded newer image for {shown}")
    else:
        print(f"Status: Image is up to date for {shown}")
    print(shown)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from layerfs.transfer import push

    if args.max_concurrent < 1:
        raise UsageError("--max-concurrent must be at least 1")
    options = _options(args)
    store = open_store(args)
    progress = _progress(args, PUSH_WORDS)
    from layerfs.model.reference import Reference

    reference = Reference.parse(args.name, default_tag=None)
    if not progress.quiet and not args.all_tags and reference.ref == "":
        print("Using default tag: latest")
    if not progress.quiet:
        print(f"The push refers to repository [{reference.registry}/{reference.remote_name}]")
    try:
        result = push(
            store,
            args.name,
            all_tags=args.all_tags,
            options=options,
            fmt=args.format,
            max_concurrent=args.max_concurrent,
            progress=progress,
            level=args.compression_level,
        )
    finally:
        progress.close()
    for tag, digest, size in result.pushed:
        print(f"{tag}: digest: {digest} size: {size}" if tag else f"digest: {digest} size: {size}")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from layerfs.registry.login import login

    password = args.password
    if args.password_stdin:
        if password is not None:
            raise UsageError("--password and --password-stdin are mutually exclusive")
        if args.username is None:
            raise UsageError("must provide --username with --password-stdin")
        password = sys.stdin.read().rstrip("\r\n")
    elif password is not None:
        print(
            "WARNING! Using --password via the CLI is insecure. Use --password-stdin.",
            file=sys.stderr,
        )
    username = args.username
    if username is None and password is None and sys.stdin.isatty():
        username = input("Username: ").strip() or None  # like docker; empty: stored ones
    if username is not None and password is None:
        if not sys.stdin.isatty():
            raise UsageError("no password given: use --password-stdin")
        import getpass

        password = getpass.getpass("Password: ")
    print(login(args.registry, username, password, options=_options(args)))
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from layerfs.registry.login import logout

    print(logout(args.registry))
    return 0
