"""Disk mode under damage: one process per directory, a corrupt SQLite file, a new embedder dimension, a snapshot
that disagrees with its rows. Each is checked through the public API."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sqlite3
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import cachelayers
from cachelayers import explain, rate_limited, semantic_cached
from cachelayers.backends.vectors.disk_files import PayloadFile
from cachelayers.embedders import embedder_name, has_stable_name
from tests.test_semantic_persistence import PARAPHRASES, QUESTIONS, ROOT, make

pytestmark = pytest.mark.anyio


async def levels(ask: Any, *questions: str) -> list[tuple[str, Any]]:
    """The level and the answer of each call."""
    out: list[tuple[str, Any]] = []
    for question in questions:
        with explain() as info:
            got = await ask(question)
        assert info.last is not None
        out.append((info.last.level, got))
    return out


# -- one process per directory ------------------------------------------------------------------------------------

SECOND = textwrap.dedent('''
    import json, sys
    import anyio
    import cachelayers
    from cachelayers import explain, semantic_cached

    directory, question = sys.argv[1], sys.argv[2]
    cachelayers.configure(vector_index=f"usearch://{directory}")

    @semantic_cached(threshold=0.8, name="persist.ask")
    async def ask(question: str, tenant: str = "t") -> dict:
        return {"q": question, "tenant": tenant, "by": "second"}

    async def main():
        levels = []
        for step in ("first", "again"):
            with explain() as info:
                got = await ask(question)
            levels.append([info.last.level, got])
            if step == "first":  # the first process writes meanwhile
                print("ready", flush=True)
                sys.stdin.readline()
        info = ask.cache_info()
        print(json.dumps({"levels": levels, "uncached": info.uncached, "index_errors": info.index_errors}))
        await ask.aclose()

    anyio.run(main)
''')


async def run_second(script: Path, directory: Path, question: str, *, first: Any = None) -> tuple[dict[str, Any], str]:
    """Run the second process; between its two calls, ``first`` (a coroutine function) runs here.

    Returns:
        What it printed (levels, answers, counters) and its log.
    """
    async with await anyio.open_process([sys.executable, str(script), str(directory), question], cwd=ROOT) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        assert child.stderr is not None
        out, err = b"", b""
        with anyio.fail_after(60):
            while b"ready\n" not in out:
                out += await child.stdout.receive()
            if first is not None:
                await first()
            await child.stdin.send(b"go\n")
            async for chunk in child.stdout:
                out += chunk
            async for chunk in child.stderr:
                err += chunk
            await child.wait()
    assert child.returncode == 0, err.decode()
    return json.loads(out.split(b"ready\n", 1)[1]), err.decode()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_second_process_on_the_directory_runs_uncached_and_serves_nothing_of_the_first(
        tmp_path: Path, anyio_backend: str) -> None:
    script = tmp_path / "second.py"
    script.write_text(SECOND)
    data = tmp_path / "data"
    ask = make(data)
    assert await levels(ask, QUESTIONS[0]) == [("computed", {"q": QUESTIONS[0], "tenant": "t"})]

    async def write_meanwhile() -> None:
        assert await levels(ask, QUESTIONS[2]) == [("computed", {"q": QUESTIONS[2], "tenant": "t"})]

    found, err = await run_second(script, data, QUESTIONS[1], first=write_meanwhile)
    mine = {"q": QUESTIONS[1], "tenant": "t", "by": "second"}
    assert found["levels"] == [["uncached", mine], ["uncached", mine]]  # its own answers, nothing stored
    assert (found["uncached"], found["index_errors"]) == (2, 2)
    assert err.count("in use by another process") == 1  # logged once
    assert str(data) in err
    assert "one process" in err
    assert "redis://" in err

    # The first process lost nothing and serves only its own answers.
    assert await levels(ask, QUESTIONS[0], QUESTIONS[2], PARAPHRASES[QUESTIONS[1]]) == [
        ("exact", {"q": QUESTIONS[0], "tenant": "t"}), ("exact", {"q": QUESTIONS[2], "tenant": "t"}),
        ("computed", {"q": PARAPHRASES[QUESTIONS[1]], "tenant": "t"})]
    await ask.aclose()

    # Closed, the directory is free: the next process uses it.
    found, _ = await run_second(script, data, QUESTIONS[0])
    assert found["levels"][0] == ["exact", {"q": QUESTIONS[0], "tenant": "t"}]
    assert found["index_errors"] == 0


async def test_two_functions_of_one_process_share_a_directory(tmp_path: Path) -> None:
    cachelayers.configure(vector_index=f"usearch://{tmp_path}")

    @semantic_cached(threshold=0.8, name="disk.first")
    async def first(question: str) -> str:
        return "first: " + question

    @semantic_cached(threshold=0.8, name="disk.second")
    async def second(question: str) -> str:
        return "second: " + question

    assert await levels(first, QUESTIONS[0]) == [("computed", "first: " + QUESTIONS[0])]
    assert await levels(second, QUESTIONS[0]) == [("computed", "second: " + QUESTIONS[0])]
    await first.aclose()
    assert await levels(second, QUESTIONS[0]) == [("exact", "second: " + QUESTIONS[0])]  # still held by second
    await second.aclose()


async def test_a_second_function_of_one_name_on_the_files_runs_uncached(tmp_path: Path) -> None:
    """Two functions sharing a ``name`` would share the files of one store and hand out the same keys."""
    ask, twin = make(tmp_path), make(tmp_path)
    assert await levels(ask, QUESTIONS[0]) == [("computed", {"q": QUESTIONS[0], "tenant": "t"})]
    assert await levels(twin, QUESTIONS[1], QUESTIONS[1]) == [("uncached", {"q": QUESTIONS[1], "tenant": "t"})] * 2
    assert await levels(ask, PARAPHRASES[QUESTIONS[1]]) == [("computed", {"q": PARAPHRASES[QUESTIONS[1]],
                                                                          "tenant": "t"})]
    await ask.aclose()
    assert await levels(twin, QUESTIONS[0]) == [("exact", {"q": QUESTIONS[0], "tenant": "t"})]  # its turn now
    await twin.aclose()


# -- a damaged file -----------------------------------------------------------------------------------------------


def moved_aside(directory: Path) -> list[str]:
    """The files a damaged SQLite file was moved to."""
    return sorted(p.name for p in directory.glob("*.corrupt-*"))


def sqlite_file(directory: Path) -> Path:
    return next(directory.glob("*.sqlite"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def garble(path: Path) -> None:
    path.write_bytes(b"not a database " * 1000)


@pytest.mark.parametrize("damage", [truncate, garble], ids=["truncated", "not-a-database"])
async def test_a_damaged_file_is_moved_aside_and_caching_resumes(tmp_path: Path, damage: Any) -> None:
    ask = make(tmp_path)
    for i in range(50):
        await ask(f"{QUESTIONS[i % 5]} number {i}")
    await ask.aclose()
    damage(sqlite_file(tmp_path))

    again = make(tmp_path)
    assert [level for level, _ in await levels(again, *QUESTIONS[:2], *QUESTIONS[:2])] == ["computed"] * 2 + [
        "exact"] * 2
    info = again.cache_info()
    assert (info.corrupt, info.index_errors, info.uncached, info.entries) == (1, 0, 0, 2)
    await again.aclose()
    aside = moved_aside(tmp_path)  # kept for a look, out of the way
    assert len(aside) == 1
    assert aside[0].startswith(sqlite_file(tmp_path).name + ".corrupt-")

    last = make(tmp_path)  # the new file is a sound one
    assert [level for level, _ in await levels(last, PARAPHRASES[QUESTIONS[0]])] == ["semantic"]
    await last.aclose()


async def test_a_file_damaged_while_open_is_moved_aside_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ask = make(tmp_path)
    await ask(QUESTIONS[0])
    real = PayloadFile.value
    calls = []

    def damaged_once(self: PayloadFile, key: int, seq: int) -> bytes | None:
        calls.append(key)
        if len(calls) == 1:
            exc = sqlite3.DatabaseError("database disk image is malformed")
            exc.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
            raise exc
        return real(self, key, seq)

    monkeypatch.setattr(PayloadFile, "value", damaged_once)
    assert await levels(ask, QUESTIONS[0], QUESTIONS[0]) == [
        ("computed", {"q": QUESTIONS[0], "tenant": "t"}), ("exact", {"q": QUESTIONS[0], "tenant": "t"})]
    info = ask.cache_info()
    assert (info.corrupt, info.index_errors, info.entries) == (1, 0, 1)
    assert len(moved_aside(tmp_path)) == 1
    await ask.aclose()


# -- a new dimension under the same embedder name -----------------------------------------------------------------


class Resized:
    """One embedder name whose vectors change dimension (a model upgrade), with no ``ndim`` attribute (as a plain
    function): texts with the same words get the same vector, others a near one."""

    name = "disk.resized"

    def __init__(self, ndim: int) -> None:
        self.size = ndim

    def __call__(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            words = " ".join(sorted(text.casefold().strip("?").split()))
            seed = int.from_bytes(hashlib.blake2b(words.encode(), digest_size=4).digest(), "big")
            rows.append(np.random.default_rng(seed).standard_normal(self.size))
        return np.asarray(rows, dtype=np.float32)


async def test_entries_of_another_dimension_are_dropped_and_new_ones_stored(tmp_path: Path) -> None:
    def resized(ndim: int) -> Any:
        return make(tmp_path, embed=Resized(ndim), cache_embeddings=False)

    old = resized(16)
    await old("first question")
    await old.aclose()

    new = resized(32)
    assert [level for level, _ in await levels(new, "question first", "second question", "Second question?")] == [
        "computed", "computed", "semantic"]  # the old entry is never compared; the new ones are stored
    assert new.cache_info().embed_errors == 0
    await new.aclose()

    again = resized(32)  # and they are there after a restart
    assert [level for level, _ in await levels(again, "question second?", "first question?")] == [
        "semantic", "semantic"]
    await again.aclose()


# -- a snapshot that is not its rows' -----------------------------------------------------------------------------


async def test_a_snapshot_vector_that_is_not_its_rows_answers_nothing(tmp_path: Path) -> None:
    """A directory two processes wrote before the lock: the snapshot holds one text's vector under the key and
    sequence number of another text's row (both processes had handed them out)."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for directory, question in ((mine, QUESTIONS[0]), (theirs, QUESTIONS[1])):
        ask = make(directory)
        await ask(question)  # key 0, sequence number 1 in each
        await ask.aclose()
    for path in theirs.glob("*.sqlite*"):
        shutil.copy(path, mine / path.name)  # their rows, my snapshot

    again = make(mine)
    assert await levels(again, PARAPHRASES[QUESTIONS[0]], PARAPHRASES[QUESTIONS[1]]) == [
        ("computed", {"q": PARAPHRASES[QUESTIONS[0]], "tenant": "t"}),
        ("semantic", {"q": QUESTIONS[1], "tenant": "t"})]  # the row's vector answers for it
    await again.aclose()


def _module_level_embedder(texts: list[str]) -> Any:
    return np.ones((len(texts), 4), dtype=np.float32)


class _Unnamed:
    def __call__(self, texts: list[str]) -> Any:
        return np.ones((len(texts), 4), dtype=np.float32)


@pytest.mark.parametrize("kind", ["lambda", "object"])
async def test_an_embedder_without_a_lasting_name_is_refused_for_a_disk_index(kind: str, tmp_path: Path) -> None:
    """Its name carries a token of this process: every restart would open an empty index, silently."""
    embedder: Any = (lambda texts: np.ones((len(texts), 4))) if kind == "lambda" else _Unnamed()
    with pytest.raises(cachelayers.ConfigError, match="embed") as info:
        @semantic_cached(embed=embedder, threshold=0.9, vector_index=f"usearch://{tmp_path}")
        async def refused(question: str) -> str:
            return question
    assert "name" in str(info.value)

    cachelayers.configure(vector_index=f"usearch://{tmp_path}")  # the settings' index: refused at the first call

    @semantic_cached(embed=embedder, threshold=0.9)
    async def ask(question: str) -> str:
        return question

    with pytest.raises(cachelayers.ConfigError, match="embed"):
        await ask("hello")
    embedder.name = "ones"  # named: accepted, and found again by the next process
    assert await ask("hello") == "hello"
    await ask.aclose()


async def test_module_level_and_in_memory_embedders_need_no_name(tmp_path: Path) -> None:
    @semantic_cached(embed=_module_level_embedder, threshold=0.9, vector_index=f"usearch://{tmp_path}")
    async def on_disk(question: str) -> str:
        return question

    @semantic_cached(embed=lambda texts: np.ones((len(texts), 4)), threshold=0.9, vector_index="memory://")
    async def in_memory(question: str) -> str:
        return question

    assert await on_disk("a") == "a"
    assert await in_memory("a") == "a"
    await on_disk.aclose()


class _NamedModel:
    name = "model-v1"

    def embed(self, texts: list[str]) -> Any:
        return np.ones((len(texts), 4), dtype=np.float32)

    @classmethod
    def embed_cls(cls, texts: list[str]) -> Any:
        return np.ones((len(texts), 4), dtype=np.float32)


class _UnnamedModel:
    def embed(self, texts: list[str]) -> Any:
        return np.ones((len(texts), 4), dtype=np.float32)


def _wrapping(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(texts: list[str]) -> Any:
        return fn(texts)

    return wrapper


@pytest.mark.parametrize(("make", "lasting"), [
    pytest.param(lambda: rate_limited("100/second")(_module_level_embedder), True, id="rate_limited-module-function"),
    pytest.param(lambda: _wrapping(_module_level_embedder), True, id="functools.wraps"),
    pytest.param(lambda: _NamedModel().embed, True, id="method-of-a-named-object"),
    pytest.param(lambda: _NamedModel.embed_cls, True, id="classmethod"),
    pytest.param(lambda: _UnnamedModel().embed, False, id="method-of-an-unnamed-object"),
    pytest.param(lambda: functools.partial(_module_level_embedder), False, id="partial"),
])
async def test_which_embedders_have_a_lasting_name(make: Any, lasting: bool, tmp_path: Path) -> None:
    embedder = make()
    assert has_stable_name(embedder) is lasting
    assert ("@" not in embedder_name(embedder)) is lasting  # a name with a process token otherwise

    async def ask(question: str) -> str:
        return question

    decorate = semantic_cached(embed=embedder, threshold=0.9, vector_index=f"usearch://{tmp_path}")
    if lasting:
        assert await decorate(ask)("a") == "a"
    else:
        with pytest.raises(cachelayers.ConfigError, match="embed"):
            decorate(ask)
