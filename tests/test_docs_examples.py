"""Every ```python block of README.md and docs/**/*.md runs, as a user would run it.

Each block runs in a fresh interpreter (``python`` of this environment, with this tree's ``src`` first), in an
empty working directory, with no ``CACHELAYERS_*`` variable set. Two HTML comments right before a block change
that:

- ``<!-- continue -->``: the block continues the previous block of the page; they run one after the other in
  one namespace (the test of the first block runs the whole chain).
- ``<!-- no-run: reason -->``: the block cannot run here (it needs a paid API or a server we cannot start);
  it is only compiled, and `test_blocks_that_do_not_run_say_why` lists it with its reason.

A block titled like a module (```` ```python title="dictstore.py" ````) is also written to that file, so later
blocks of the page can import it, as the page tells its reader to do.

Addresses of servers are the only thing changed before running: every ``redis://host:port`` and
``memcached://host:port`` points at the test's own server (credentials dropped), and ``disk:///absolute/path``
(or ``usearch:///…``) lands in the working directory, so that examples keep the addresses a reader would use.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[1]
PAGES: Final = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE: Final = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)
_TITLE: Final = re.compile(r'title="(?P<title>[A-Za-z_][A-Za-z0-9_]*\.py)"')
_SERVER_URL: Final = re.compile(r"\b(?P<scheme>redis|memcached)://(?:[^@/\s\"'?]*@)?[A-Za-z0-9_.\-]+(?::\d+)?")
_DISK_URL: Final = re.compile(r"\b(?P<scheme>disk|usearch):///")
TIMEOUT: Final = 180


@dataclass
class Block:
    """One ```python block of a page."""

    page: str
    index: int
    line: int
    code: str
    marks: list[str]
    title: str | None
    chain: list[Block] = field(default_factory=list)
    """For the first block of a chain: itself and the blocks that continue it."""

    @property
    def name(self) -> str:
        return f"{self.page}:{self.index}"

    @property
    def no_run(self) -> str | None:
        """The reason given with ``no-run:``, or ``None``."""
        for mark in self.marks:
            if mark.startswith("no-run"):
                return mark.partition(":")[2].strip()
        return None

    @property
    def continues(self) -> bool:
        return "continue" in self.marks


def _marks_before(text: str, start: int) -> list[str]:
    """The HTML comments that directly precede ``start`` (only blank space between them), in order."""
    marks: list[str] = []
    before = text[:start].rstrip()
    while before.endswith("-->") and (opening := before.rfind("<!--")) >= 0:
        marks.insert(0, " ".join(before[opening + 4:-3].split()))
        before = before[:opening].rstrip()
    return marks


def collect() -> list[Block]:
    """Every block of every page, chains linked to their first block."""
    blocks: list[Block] = []
    for path in PAGES:
        text = path.read_text(encoding="utf-8")
        page = str(path.relative_to(ROOT))
        head: Block | None = None
        for index, match in enumerate(_FENCE.finditer(text)):
            title = _TITLE.search(match.group("info"))
            block = Block(page, index, text.count("\n", 0, match.start()) + 1, match.group("code"),
                          _marks_before(text, match.start()), title.group("title") if title else None)
            if block.continues:
                assert head is not None, f"{block.name}: <!-- continue --> on the first block of the page"
                head.chain.append(block)
            else:
                block.chain = [block]
                head = block
            blocks.append(block)
    return blocks


BLOCKS: Final = collect()
RUNNABLE: Final = [b for b in BLOCKS if b.chain and b.no_run is None]

_RUNNER: Final = """
import json, sys
namespace = {"__name__": "__main__"}
for name, code in json.load(sys.stdin):
    print(f"--- {name}", flush=True)
    exec(compile(code, name, "exec"), namespace)
"""


def _rewrite(code: str, servers: dict[str, str], workdir: Path) -> str:
    def server(match: re.Match[str]) -> str:
        return servers.get(match.group("scheme"), match.group(0))

    return _DISK_URL.sub(lambda m: f"{m.group('scheme')}://{workdir}/", _SERVER_URL.sub(server, code))


def _servers(chain: list[Block], request: pytest.FixtureRequest) -> dict[str, str]:
    code = "".join(b.code for b in chain)
    servers: dict[str, str] = {}
    if "redis://" in code:
        servers["redis"] = str(request.getfixturevalue("redis_url")).removesuffix("/0")
    if "memcached://" in code:
        servers["memcached"] = str(request.getfixturevalue("memcached_url"))
    return servers


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_block_runs(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The block (with the blocks that continue it) runs to the end in a fresh interpreter."""
    servers = _servers(block.chain, request)
    page_blocks = [b for b in BLOCKS if b.page == block.page]
    for module in page_blocks:
        if module.title is not None:  # a module the page asks its reader to save, imported by other blocks
            (tmp_path / module.title).write_text(_rewrite(module.code, servers, tmp_path), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHELAYERS_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(tmp_path)]), HOME=str(tmp_path),
               XDG_CACHE_HOME=str(tmp_path / ".cache"))
    script = [(f"{b.page}, block {b.index} (line {b.line})", _rewrite(b.code, servers, tmp_path))
              for b in block.chain]
    done = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(script), capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, f"{block.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_blocks_that_do_not_run_say_why_and_compile() -> None:
    """The blocks marked ``no-run`` give a reason and are valid Python; the list is printed (``-s``)."""
    skipped = [b for b in BLOCKS if b.no_run is not None]
    for block in skipped:
        assert block.no_run, f"{block.name}: <!-- no-run: ... --> needs a reason"
        compile(block.code, block.name, "exec")
        print(f"not run: {block.name} (line {block.line}): {block.no_run}")
    assert len(skipped) <= len(BLOCKS) // 5, "most examples must run"


def test_every_block_is_run_or_marked() -> None:
    """Each block is the start of a chain, a continuation of one, or marked no-run: none is left out."""
    continued = {id(b) for head in BLOCKS for b in head.chain[1:]}
    for block in BLOCKS:
        assert block.no_run is not None or block.chain or id(block) in continued, block.name
    assert len(BLOCKS) >= 50
    assert sum(len(b.chain) for b in RUNNABLE) + sum(b.no_run is not None for b in BLOCKS) == len(BLOCKS)


def test_markers_are_read(tmp_path: Path) -> None:
    text = ("# Page\n\n```python\nx = 1\n```\n\n<!-- continue -->\n```python\nassert x == 1\n```\n\n"
            "<!-- no-run: needs the moon -->\n```python\nimport moon\n```\n")
    first = text.index("```python")
    assert _marks_before(text, first) == []
    second = text.index("```python", first + 1)
    assert _marks_before(text, second) == ["continue"]
    third = text.index("```python", second + 1)
    assert _marks_before(text, third) == ["no-run: needs the moon"]


_RANK: Final = {"multilevel_cached": 0, "semantic_cached": 1, "batched": 2, "rate_limited": 3}
"""The one decorator order (docs/guides/exact-caching.md#decorator-order), top first."""
_DECORATOR: Final = re.compile(r"^@(?P<name>\w+)", re.M)


def _stacks(code: str) -> list[list[str]]:
    """The names of the decorators stacked on each function of ``code``, top first."""
    stacks: list[list[str]] = []
    current: list[str] = []
    for line in code.splitlines():
        found = _DECORATOR.match(line)
        if found:
            current.append(found.group("name"))
        elif line.startswith(("async def", "def", "class")):
            if current:
                stacks.append(current)
            current = []
    return stacks


def test_every_example_stacks_decorators_in_the_one_order() -> None:
    """Caches on top (exact, then semantic), `@batched` only on batch functions, `@rate_limited` innermost."""
    stacked = 0
    for block in BLOCKS:
        for stack in _stacks(block.code):
            ours = [name for name in stack if name in _RANK]
            stacked += len(ours) > 1
            assert ours == sorted(ours, key=_RANK.__getitem__), f"{block.name}: {stack}"
            assert not ("batched" in ours and {"multilevel_cached", "semantic_cached"} & set(ours)), \
                f"{block.name}: @batched goes on the batch function, not on a cached one"
    assert stacked >= 2
    assert _stacks("@a\n@multilevel_cached\n@rate_limited\nasync def f(): ...\n") == [
        ["a", "multilevel_cached", "rate_limited"]]


def test_an_example_that_defines_main_runs_it() -> None:
    """A ``main()`` that is defined and never called would make the example pass without running anything."""
    for block in BLOCKS:
        if block.no_run is None and re.search(r"^(async )?def main\(", block.code, re.M):
            assert re.search(r"^(asyncio\.run\(main\(\)\)|anyio\.run\(main\)|trio\.run\(main\)|main\(\))\s*$",
                             block.code, re.M), f"{block.name} defines main() and never runs it"
