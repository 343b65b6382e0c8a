"""`rlk2 sandbox build [--offline] | doctor | exec [--input FILE] | serve` (also `python -m sandboxes.cli ...`).

exec reads JSONL jobs `{"id","code","tests"|"test_cases","entry_point"?,"timeout_s"?,"memory_mb"?}` (stdin when no
FILE) and writes one result `{"id","status","passed","total","wall_s","stdout","stderr"}` per job, in input order.
This package may not import rlk2, so user errors are handled here: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TextIO

from sandboxes import DEFAULT_IMAGE, Limits, open_backend, probe
from sandboxes.bwrap_backend import BwrapOptions, resolve_root
from sandboxes.docker_backend import default_engines, engine_client
from sandboxes.image import MIRROR, SUITE, build_dockerfile, build_offline
from sandboxes.result import JobError, SandboxError, read_jobs
from sandboxes.serve import serve

PROG = "rlk2 sandbox"


class CliError(Exception):
    """A user mistake or an unusable environment; printed as one line, exit 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sandbox_command", required=True, metavar="{build,doctor,exec,serve}")

    b = sub.add_parser("build", help="build the sandbox image (Dockerfile, or --offline: debootstrap + docker import)")
    b.add_argument("--offline", action="store_true", help="debootstrap a Debian root filesystem instead of pulling")
    b.add_argument("--engine", help="engine URL (default: $DOCKER_HOST or the local socket)")
    b.add_argument("--suite", default=None, help="Debian suite for --offline (default bookworm)")
    b.add_argument("--mirror", default=None, help="Debian mirror for --offline")
    b.add_argument("--fresh-rootfs", action="store_true", help="re-run debootstrap even if a cached rootfs exists")

    sub.add_parser("doctor", help="say which sandbox backends work here, and why not the others")

    e = sub.add_parser("exec", help="run JSONL jobs, write JSONL results in input order")
    e.add_argument("--input", metavar="FILE", help="JSONL jobs (default: stdin)")
    _pool_arguments(e)

    s = sub.add_parser("serve", help="serve the pool over HTTP on loopback: POST /run with JSONL jobs")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8377)
    _pool_arguments(s)


def _pool_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["docker", "bwrap"], help="default: $RLK2_SANDBOX_BACKEND, else docker > bwrap")
    p.add_argument("--engine", action="append", help="Docker engine URL; repeat for a pool over several engines")
    p.add_argument(
        "--pool-size",
        type=int,
        help="sandboxes (per engine for docker); default 1 per CPU for docker, 2 per CPU for bwrap",
    )
    p.add_argument("--timeout-s", type=float, help="default per-job wall-clock limit (seconds)")
    p.add_argument("--memory-mb", type=int, help="default per-job memory limit (MiB)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    try:
        return {"build": _build, "doctor": _doctor, "exec": _exec, "serve": _serve}[args.sandbox_command](args)
    except (CliError, SandboxError) as exc:
        print(f"{PROG} {args.sandbox_command}: error: {exc}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------------- commands
def _build(args: argparse.Namespace) -> int:
    import docker  # the SDK loads only where a command talks to an engine (`rlk2 --help` stays fast)

    url = args.engine or default_engines()[0]
    try:
        client = engine_client(url, timeout=600)
        client.ping()
    except Exception as exc:
        raise CliError(
            f"Docker engine {url} does not answer ({str(exc).splitlines()[0] if str(exc) else exc!r})"
        ) from None
    try:
        if args.offline:
            report = build_offline(
                client,
                DEFAULT_IMAGE,
                suite=args.suite or SUITE,
                mirror=args.mirror or MIRROR,
                fresh_rootfs=args.fresh_rootfs,
            )
        else:
            report = build_dockerfile(client, DEFAULT_IMAGE)
    except docker.errors.DockerException as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    print(report.line())
    return 0


def _doctor(args: argparse.Namespace) -> int:

    found = probe()
    details = {
        "docker": f"engines {', '.join(default_engines())}, image {DEFAULT_IMAGE}",
        "bwrap": f"root {resolve_root(BwrapOptions())}",
    }
    for name, problem in found.items():
        print(f"{name}: ok ({details[name]})" if problem is None else f"{name}: unavailable: {problem}")
    return 0 if any(p is None for p in found.values()) else 1


def _open(args: argparse.Namespace):
    overrides = {}
    if args.timeout_s is not None:
        if args.timeout_s <= 0:
            raise CliError("--timeout-s must be positive")
        overrides["timeout_s"] = args.timeout_s
    if args.memory_mb is not None:
        if args.memory_mb < 32:
            raise CliError("--memory-mb must be at least 32")
        overrides["memory_mb"] = args.memory_mb
    if args.pool_size is not None and args.pool_size < 1:
        raise CliError("--pool-size must be at least 1")
    return open_backend(args.backend, pool_size=args.pool_size, limits=Limits(**overrides), engines=args.engine)


def _exec(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.input:
        try:
            with open(args.input, "rb") as f:
                jobs = read_jobs(f, args.input)
        except OSError as exc:
            raise CliError(f"cannot read {args.input}: {exc.strerror}") from None
        except JobError as exc:
            raise CliError(str(exc)) from None
    else:
        try:
            jobs = read_jobs(getattr(sys.stdin, "buffer", sys.stdin), "<stdin>")
        except JobError as exc:
            raise CliError(str(exc)) from None
    if not jobs:
        return 0
    with _open(args) as pool:
        futures = [pool.submit(job) for job in jobs]
        for fut in futures:  # input order; each line as soon as it and all before it are done
            out.write(json.dumps(fut.result().to_json()) + "\n")
            out.flush()
    return 0


def _serve(args: argparse.Namespace) -> int:

    with _open(args) as pool:
        serve(pool, args.host, args.port)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{PROG}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
