"""The ``cachelayers`` command.

Subcommands: ``demo`` (replay a simulated AI pipeline through the caches and report), ``stats`` (the settings
in force, the state of every tier, and entries and bytes per namespace in the disk, Redis and memcached
tiers), ``invalidate`` (drop entries by tag or namespace from every tier, saying how many),
``calibrate`` (choose a semantic similarity threshold from labelled pairs), ``bench`` (run the benchmarks of a
source checkout).

A subcommand is one function registered with `command`: it receives the parsed arguments and returns the exit
code; its options are added by the function given as ``arguments``. Exit codes: 0 success, 1 the command
ran but failed (a tier unreachable, an invalidation not done, a benchmark failed), 2 bad usage or bad
configuration (the `ConfigError` message, naming the field, is printed; never a traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio

from cachelayers.errors import ConfigError, redact_urls

__all__ = ["Command", "build_parser", "command", "main"]

Run = Callable[[argparse.Namespace], int]


@dataclasses.dataclass(frozen=True)
class Command:
    """A registered subcommand."""

    name: str
    help: str
    run: Run
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


_commands: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None
            ) -> Callable[[Run], Run]:
    """Register the decorated function as the subcommand ``name``.

    Args:
        name: The subcommand, e.g. ``"calibrate"``.
        help: One line for ``cachelayers --help``.
        arguments: Adds the subcommand's options to its parser.

    Returns:
        A decorator that registers the function and returns it unchanged.
    """

    def register(run: Run) -> Run:
        _commands[name] = Command(name, help, run, arguments)
        return run

    return register


def _error(message: str) -> None:
    print(f"cachelayers: {message}", file=sys.stderr)


# -- demo -------------------------------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=2000, metavar="N", help="requests to replay (default 2000)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the request stream (default 7)")
    parser.add_argument("--concurrency", type=int, default=8, metavar="N",
                        help="requests in flight at once (default 8)")
    parser.add_argument("--latency-scale", type=float, default=1.0, metavar="X",
                        help="factor on the simulated provider latencies (default 1.0)")
    parser.add_argument("--fresh", action="store_true",
                        help="remove the demo's entries from every tier first (by default they are kept: a second "
                             "run is answered from the disk tier)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


@command("demo", "replay a simulated AI pipeline through all four decorators and report savings", _demo_arguments)
def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cachelayers.demo import DemoConfig, DemoReport, render_report, report_json, run_demo
    from cachelayers.engines import default_cache
    from cachelayers.settings import configure

    if "CACHELAYERS_TIERS" not in os.environ:
        # Memory over disk unless told otherwise: entries outlive the process, so a second run starts warm.
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cachelayers" / "demo"
        configure(tiers={"memory": "memory://", "disk": f"disk://{cache_dir}?max_bytes=256MiB"})
    default_cache()  # a bad configuration fails here, before the progress bar is drawn
    config = DemoConfig(requests=args.requests, seed=args.seed, concurrency=args.concurrency,
                        latency_scale=args.latency_scale, fresh=args.fresh)
    progress = Progress(TextColumn("[bold]replaying"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[from_cache]} from cache"), TimeElapsedColumn(),
                        console=Console(stderr=True), disable=args.quiet, transient=False)
    task = progress.add_task("replay", total=config.requests, from_cache=0)

    def advance(done: int, from_cache: int) -> None:
        progress.update(task, completed=done, from_cache=f"{from_cache:,}")

    async def replay() -> DemoReport:
        try:
            return await run_demo(config, progress=advance)
        finally:
            # Connections of shared tiers belong to this event loop, which ends here.
            await default_cache().aclose()

    with progress:
        report = anyio.run(replay)
    if args.json:
        print(report_json(report))
    else:
        console = Console()
        if not console.is_terminal:  # rich assumes 80 columns when piped; the report needs about 120
            console = Console(width=130)
        render_report(report, console)
    return 0


# -- stats ------------------------------------------------------------------------------------------------


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


async def _probe_tiers() -> dict[str, Any]:
    from cachelayers.engines.tiered import TieredCache
    from cachelayers.settings import get_settings

    settings = get_settings()
    cache = TieredCache(settings)
    tiers: dict[str, Any] = {}
    try:
        if cache.local is not None:
            local = cache.local
            tiers[cache.local_name] = {
                "url": local.url.redacted(), "kind": "in-process memory (this process only)",
                "entries": len(local), "max_entries": local.max_entries, "bytes": local.bytes_used,
                "max_bytes": local.max_bytes, "reachable": True,
            }
        probe = cache.storage_key("cachelayers-stats-probe")
        for tier in cache.tiers:
            entry: dict[str, Any] = {"url": tier.backend.url.redacted(), "kind": type(tier.backend).__name__}
            started = time.perf_counter()
            try:
                with anyio.fail_after(max(settings.tier_timeout, 1.0)):
                    await tier.backend.get_many([probe])
            except Exception as exc:
                entry.update(reachable=False, error=redact_urls(f"{type(exc).__name__}: {exc}"))
            else:
                entry.update(reachable=True, latency_ms=(time.perf_counter() - started) * 1e3)
                entry.update(await _namespaces(cache, tier.backend))
            tiers[tier.name] = entry
    finally:
        await cache.aclose()
    return {
        "settings": repr(settings),
        "tiers": tiers,
        "limits": settings.limit_specs,
        "vector_index": redact_urls(settings.vector_index),
    }


async def _namespaces(cache: Any, backend: Any) -> dict[str, Any]:
    """``entries``, ``bytes`` and ``namespaces`` (each with its entries and bytes) of a lower tier, or the
    error that kept it from telling; nothing for a backend that cannot tell."""
    from cachelayers.backends.usage import tag_usage
    from cachelayers.engines import namespace_tag

    prefix = cache.tier_tags([namespace_tag("")])[0]
    try:
        with anyio.fail_after(60):
            usage = await tag_usage(backend, prefix)
    except Exception as exc:
        return {"usage_error": f"{type(exc).__name__}: {exc}"}
    if usage is None:
        return {}
    namespaces = {tag[len(prefix):]: {"entries": u.entries, "bytes": u.bytes} for tag, u in sorted(usage.items())}
    return {"entries": sum(u.entries for u in usage.values()), "bytes": sum(u.bytes for u in usage.values()),
            "namespaces": namespaces}


def _print_stats(document: dict[str, Any], out: TextIO) -> None:
    print(f"settings in force: {document['settings']}", file=out)
    print("tiers (fastest first):", file=out)
    for name, tier in document["tiers"].items():
        if "max_entries" in tier:
            state = (f"{tier['kind']}: {tier['entries']:,} of {tier['max_entries']:,} entries, "
                     f"{_size(tier['bytes'])} of {_size(tier['max_bytes'])}")
        elif tier["reachable"]:
            state = f"{tier['kind']}: reachable ({tier['latency_ms']:.1f} ms)"
            if "entries" in tier:
                state += f", {tier['entries']:,} entries in namespaces, {_size(tier['bytes'])}"
            elif "usage_error" in tier:
                state += f", entries unknown ({tier['usage_error']})"
        else:
            state = f"{tier['kind']}: UNREACHABLE ({tier['error']})"
        print(f"  {name}  {tier['url']}  {state}", file=out)
        for namespace, usage in tier.get("namespaces", {}).items():
            print(f"      namespace {namespace!r}: {usage['entries']:,} entries, {_size(usage['bytes'])}", file=out)
    limits = document["limits"]
    print(f"rate limits: {', '.join(f'{k}={v}' for k, v in limits.items()) if limits else 'none'}", file=out)
    print(f"vector index: {document['vector_index']}", file=out)


@command("stats", "show the settings in force and check every tier (exit 1 if one is unreachable)",
         _stats_arguments)
def _stats(args: argparse.Namespace) -> int:
    document = anyio.run(_probe_tiers)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print_stats(document, sys.stdout)
    return 0 if all(t["reachable"] for t in document["tiers"].values()) else 1


# -- invalidate -------------------------------------------------------------------------------------------


def _invalidate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tag", action="append", default=[], metavar="TAG",
                        help="remove every entry carrying TAG (repeatable)")
    parser.add_argument("--namespace", action="append", default=[], metavar="NS",
                        help="remove every entry of namespace NS, by default a function's module.qualname "
                             "(repeatable)")
    parser.add_argument("--actor", default=os.environ.get("USER"), metavar="NAME",
                        help="who invalidates, for the audit records (default: $USER)")


def _check_name(kind: str, name: str) -> None:
    """Refuse a tag or namespace that cannot name what the user means (exit 2)."""
    from cachelayers.engines import namespace_tag

    reserved = namespace_tag("")
    if not name.strip():
        raise _UsageError(f"--{kind} must not be empty")
    if name != name.strip():
        raise _UsageError(f"--{kind} {name!r} starts or ends with white space; names are matched exactly")
    if kind == "tag" and name.startswith(reserved):
        raise _UsageError(f"--tag {name!r} starts with {reserved!r}, the form reserved for namespace tags; "
                          f"use --namespace {name[len(reserved):]!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise _UsageError(f"--{kind} {name!r} contains a control character")


async def _invalidate_everywhere(tags: Sequence[str], namespaces: Sequence[str], actor: str | None
                                 ) -> tuple[Any, dict[str, dict[str, int | None]]]:
    """Invalidate through the guarded, audited path the admin endpoint uses; return its outcome, and per tier
    the entries each tag or namespace held just before."""
    from cachelayers import audit
    from cachelayers.backends.usage import tag_usage
    from cachelayers.engines import namespace_tag
    from cachelayers.engines.tiered import TieredCache
    from cachelayers.engines.tiered.guard import invalidate_everywhere
    from cachelayers.settings import get_settings

    cache = TieredCache(get_settings())
    named = {**{f"tag {t!r}": t for t in tags}, **{f"namespace {n!r}": namespace_tag(n) for n in namespaces}}
    counts: dict[str, dict[str, int | None]] = {}
    try:
        for tier in cache.tiers:
            counts[tier.name] = {}
            for what, tag in named.items():
                qualified = cache.tier_tags([tag])[0]
                try:
                    with anyio.fail_after(60):
                        usage = await tag_usage(tier.backend, qualified)
                except Exception:
                    usage = None  # the invalidation below reports the failure
                counts[tier.name][what] = None if usage is None else usage.get(qualified, (0, 0))[0]
        with audit.actor(actor):  # the same guarded, audited path as the admin endpoint
            return await invalidate_everywhere(cache, tags=tags, namespaces=namespaces), counts
    finally:
        await cache.aclose()


@command("invalidate", "remove entries by tag or namespace from every configured tier", _invalidate_arguments)
def _invalidate(args: argparse.Namespace) -> int:
    if not args.tag and not args.namespace:
        raise _UsageError("invalidate needs at least one --tag or --namespace")
    for tag in args.tag:
        _check_name("tag", tag)
    for namespace in args.namespace:
        _check_name("namespace", namespace)
    outcome, counts = anyio.run(_invalidate_everywhere, args.tag, args.namespace, args.actor)
    from cachelayers.settings import get_settings

    tiers = get_settings().tier_urls
    shared = [name for name, url in tiers.items() if not url.lower().startswith("memory:")]
    if outcome.refused:
        wait = "" if outcome.retry_after is None else f"; retry in {outcome.retry_after:.1f}s"
        _error(f"invalidation_limit reached: not invalidated: {', '.join(outcome.refused)}{wait}")
        return 1
    if outcome.failed_tiers:
        _error(f"invalidation failed on tier(s) {', '.join(outcome.failed_tiers)}; entries there may still be "
               f"served")
        return 1
    what = ", ".join([f"tag {t!r}" for t in args.tag] + [f"namespace {n!r}" for n in args.namespace])
    if shared:
        print(f"invalidated {what} on {', '.join(shared)}")
        for tier_name in shared:
            for item, count in counts.get(tier_name, {}).items():
                told = "entries not counted (the tier cannot list them)" if count is None else \
                    f"{count:,} {'entry' if count == 1 else 'entries'} removed"
                print(f"  {tier_name}: {item}: {told}")
    else:
        print(f"nothing to do for {what}: every configured tier is in-process memory, which lives only in "
              f"the processes using it (configure CACHELAYERS_TIERS with a shared tier)")
    return 0


# -- bench ------------------------------------------------------------------------------------------------


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run, e.g. 'memory' for benchmarks/bench_memory.py (default: all)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--dir", type=Path, default=None, help="the benchmarks directory (default: ./benchmarks or "
                                                               "the one next to this package's source)")
    parser.add_argument("--args", default="", metavar="'ARGS'",
                        help="arguments passed to every benchmark, e.g. --args='--rounds 5 --json'")


def _benchmarks_dir(explicit: Path | None) -> Path:
    candidates = [explicit] if explicit is not None else [Path.cwd() / "benchmarks",
                                                           Path(__file__).resolve().parents[2] / "benchmarks"]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("bench_*.py")):
            return candidate
    raise _UsageError(f"no benchmarks found in {' or '.join(str(c) for c in candidates)}; they ship with the "
                      f"source tree (run from a clone, or pass --dir)")


def _summary_line(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return ""
    for quote in ('"""', "'''"):
        if text.lstrip().startswith(quote):
            return text.lstrip()[3:].split("\n", 1)[0].strip()
    return ""


@command("bench", "run the benchmarks of a source checkout (benchmarks/bench_*.py)", _bench_arguments)
def _bench(args: argparse.Namespace) -> int:
    import shlex

    directory = _benchmarks_dir(args.dir)
    available = {p.stem.removeprefix("bench_"): p for p in sorted(directory.glob("bench_*.py"))}
    if args.list:
        for name, path in available.items():
            print(f"{name:12s} {_summary_line(path)}")
        return 0
    unknown = [n for n in args.names if n not in available]
    if unknown:
        raise _UsageError(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
    extra = shlex.split(args.args)
    status = 0
    for name in args.names or list(available):
        print(f"==> benchmarks/{available[name].name} {' '.join(extra)}".rstrip(), flush=True)
        status = max(status, subprocess.call([sys.executable, str(available[name]), *extra]))
    return 1 if status else 0


# -- calibrate --------------------------------------------------------------------------------------------


def _calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    from cachelayers.calibrate import add_calibrate_arguments

    add_calibrate_arguments(parser)


@command("calibrate", "choose a semantic similarity threshold from labelled pairs (precision/recall, plot)",
         _calibrate_arguments)
def _calibrate(args: argparse.Namespace) -> int:
    from cachelayers.calibrate import run_calibrate

    return run_calibrate(args)


# -- entry point ------------------------------------------------------------------------------------------


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


class _UsageError(Exception):
    """Bad use of a subcommand that argparse cannot see (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``cachelayers`` command, with every registered subcommand."""
    from cachelayers import __version__

    parser = argparse.ArgumentParser(
        prog="cachelayers",
        description="Caching for expensive async calls in AI pipelines. Configuration comes from CACHELAYERS_* "
                    "environment variables (e.g. CACHELAYERS_TIERS=memory://,redis://localhost:6379/0).",
    )
    parser.add_argument("--version", action="version", version=f"cachelayers {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in _commands.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(sub)
        sub.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cachelayers`` command with ``argv`` (``sys.argv[1:]`` when omitted); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 after --help and --version
        return exc.code if isinstance(exc.code, int) else 2
    try:
        status: int = args._run(args)
    except ConfigError as exc:
        _error(f"configuration error: {exc}")
        return 2
    except BaseExceptionGroup as group:  # raised in a task group: still a configuration error if only that
        config_errors, rest = group.split(ConfigError)
        if rest is not None or config_errors is None:
            raise
        _error(f"configuration error: {_first_leaf(config_errors)}")
        return 2
    except _UsageError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
