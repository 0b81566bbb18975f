"""Disk mode: entries and graphs survive a restart, and a crash at any step never serves a wrong answer."""

from __future__ import annotations

import dataclasses
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

import cachelayers
from cachelayers import explain, semantic_cached
from cachelayers.backends.vectors.disk_store import DiskStore
from tests.conftest import FakeClock

pytestmark = pytest.mark.anyio

QUESTIONS = [
    "how do I reset the password of my router",
    "what is the boiling point of water on mount everest",
    "which river flows through the city of vienna",
    "how many moons does the planet neptune have",
    "who painted the ceiling of the sistine chapel",
]
ROOT = Path(__file__).resolve().parents[1]
PARAPHRASES = {q: q.replace("how do I", "how can I").replace("what is", "what's") + "?" for q in QUESTIONS}


def suffixes(directory: Path) -> list[str]:
    return sorted(p.suffix for p in directory.iterdir())


def tear_snapshot(directory: Path) -> None:
    """Cut the snapshot file in half, as a torn write would leave it."""
    snapshot = next(directory.glob("*.usearch"))
    snapshot.write_bytes(snapshot.read_bytes()[: snapshot.stat().st_size // 2])


def make(directory: Path, **options: Any) -> Any:
    cachelayers.configure(vector_index=f"usearch://{directory}")

    @semantic_cached(threshold=0.8, name="persist.ask", **options)
    async def ask(question: str, tenant: str = "t") -> dict[str, str]:
        return {"q": question, "tenant": tenant}

    return ask


async def test_entries_survive_a_restart(tmp_path: Path) -> None:
    ask = make(tmp_path)
    for q in QUESTIONS:
        await ask(q)
    await ask(QUESTIONS[0], tenant="other")
    await ask.aclose()
    assert suffixes(tmp_path) == [".lock", ".sqlite", ".usearch"]  # the lock file stays: it is not held

    again = make(tmp_path)
    with explain() as info:
        for q in QUESTIONS:
            assert await again(PARAPHRASES[q]) == {"q": q, "tenant": "t"}
        assert await again(QUESTIONS[1]) == {"q": QUESTIONS[1], "tenant": "t"}
        assert await again(PARAPHRASES[QUESTIONS[0]], tenant="other") == {"q": QUESTIONS[0], "tenant": "other"}
    assert [lookup.level for lookup in info] == ["semantic"] * 5 + ["exact", "semantic"]
    await again.aclose()


async def test_a_restart_without_a_snapshot_rebuilds_the_graph_from_the_rows(tmp_path: Path) -> None:
    ask = make(tmp_path)
    for q in QUESTIONS:
        await ask(q)
    store = ask.cache._store
    assert isinstance(store.persistence, DiskStore)
    await store.persistence.aclose()  # no snapshot was ever written (save_every is 1000)
    ask.cache._store = None
    assert ".usearch" not in suffixes(tmp_path)
    again = make(tmp_path)
    for q in QUESTIONS:
        assert await again(PARAPHRASES[q]) == {"q": q, "tenant": "t"}
    await again.aclose()


async def test_expired_entries_are_dropped_on_load(tmp_path: Path, clock: FakeClock) -> None:
    ask = make(tmp_path, ttl=10, clock=clock)
    await ask(QUESTIONS[0])
    await ask.aclose()
    clock.advance(11)
    again = make(tmp_path, ttl=10, clock=clock)
    with explain() as info:
        await again(QUESTIONS[0])
    assert info.last is not None
    assert info.last.level == "computed"
    assert again.cache_info().entries == 1
    await again.aclose()


async def test_entries_of_another_embedder_are_never_compared(tmp_path: Path) -> None:
    ask = make(tmp_path)
    await ask(QUESTIONS[0])
    await ask.aclose()
    other = make(tmp_path, embed=cachelayers.HashingEmbedder(128))  # another vector space
    with explain() as info:
        await other(QUESTIONS[0])
    assert info.last is not None
    assert info.last.level == "computed"
    assert other.cache_info().entries == 1
    await other.aclose()


async def test_a_torn_snapshot_is_ignored(tmp_path: Path) -> None:
    ask = make(tmp_path)
    for q in QUESTIONS:
        await ask(q)
    await ask.aclose()
    tear_snapshot(tmp_path)
    again = make(tmp_path)
    for q in QUESTIONS:
        assert await again(PARAPHRASES[q]) == {"q": q, "tenant": "t"}
    await again.aclose()


async def test_unstorable_values_are_returned_and_counted(tmp_path: Path) -> None:
    cachelayers.configure(vector_index=f"usearch://{tmp_path}")

    @semantic_cached(threshold=0.8)
    async def ask(question: str) -> object:
        return object()

    first = await ask("something nobody can encode")
    assert first is not await ask("something nobody can encode")
    assert ask.cache_info().unstorable == 2
    await ask.aclose()


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    sources: tuple[str, ...]


async def test_classes_the_return_annotation_names_are_stored_without_registration(tmp_path: Path) -> None:
    cachelayers.configure(vector_index=f"usearch://{tmp_path}")

    @semantic_cached(threshold=0.8, name="persist.typed")
    async def ask(question: str) -> Answer:
        return Answer(question.upper(), ("manual",))

    assert await ask(QUESTIONS[0]) == Answer(QUESTIONS[0].upper(), ("manual",))
    assert ask.cache_info().unstorable == 0
    await ask.aclose()

    @semantic_cached(threshold=0.8, name="persist.typed")
    async def again(question: str) -> Answer:
        raise AssertionError("answered from the disk")

    with explain() as info:
        assert await again(PARAPHRASES[QUESTIONS[0]]) == Answer(QUESTIONS[0].upper(), ("manual",))
    assert info.last is not None
    assert info.last.level == "semantic"
    await again.aclose()


# -- crashes --------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent('''
    import os, signal, sys
    import anyio
    import cachelayers
    from cachelayers import semantic_cached
    from cachelayers.backends.vectors import index as usearch_index

    directory, scenario = sys.argv[1], sys.argv[2]
    cachelayers.configure(vector_index=f"usearch://{directory}")
    QUESTIONS = QUESTIONS_LITERAL

    @semantic_cached(threshold=0.8, name="persist.ask", max_entries=2)
    async def ask(question: str, tenant: str = "t") -> dict:
        return {"q": question, "tenant": tenant}

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        die()

    async def main():
        await ask(QUESTIONS[0])
        await ask(QUESTIONS[1])
        await ask.save()  # snapshot: keys 0, 1
        if scenario == "index-add":  # the row of QUESTIONS[2] is committed, its vector never added
            usearch_index.VectorIndex.add = die
            await ask(QUESTIONS[2])
        elif scenario == "index-remove":  # the eviction of QUESTIONS[0] is committed, its vector still there
            usearch_index.VectorIndex.remove = die
            await ask(QUESTIONS[2])
        elif scenario == "key-reuse":  # keys are reused by other texts after the snapshot
            await ask(QUESTIONS[2])  # evicts 0
            await ask(QUESTIONS[3])  # evicts 1, takes key 0
            await ask(QUESTIONS[4])  # evicts 2, takes key 1
            die()
        elif scenario == "before-rename":  # a new snapshot is written but never renamed into place
            await ask(QUESTIONS[2])
            await ask(QUESTIONS[3])
            os.replace = die
            await ask.save()
        elif scenario == "after-rename":  # the new snapshot is in place, then rows change and we die
            await ask(QUESTIONS[2])
            os.replace = replace_then_die
            await ask.save()
        elif scenario == "mid-write":  # the temporary snapshot file is half written
            await ask(QUESTIONS[2])
            real_fsync = os.fsync
            def torn_fsync(fd):
                os.ftruncate(fd, 100)
                die()
            os.fsync = torn_fsync
            await ask.save()
        print("no crash", flush=True)

    anyio.run(main)
''')


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("scenario", ["index-add", "index-remove", "key-reuse", "before-rename", "after-rename",
                                      "mid-write"])
async def test_a_crash_at_any_step_never_leaves_an_entry_that_answers_wrongly(
        tmp_path: Path, scenario: str, anyio_backend: str) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("QUESTIONS_LITERAL", repr(QUESTIONS)))
    data = tmp_path / "data"
    with anyio.fail_after(120):
        result = await anyio.run_process([sys.executable, str(script), str(data), scenario], check=False, cwd=ROOT)
    assert result.returncode == -signal.SIGKILL, (result.stdout + result.stderr).decode()

    ask = make(data, max_entries=2)
    store = None
    for q in QUESTIONS:  # every answer is for the question asked (or freshly computed), never another's
        for asked in (q, PARAPHRASES[q]):
            with explain() as info:
                got = await ask(asked)
            lookup = info.last
            assert lookup is not None
            if lookup.level == "computed":
                assert got == {"q": asked, "tenant": "t"}
            else:
                assert got == {"q": q, "tenant": "t"}, f"{asked!r} answered with {got!r} ({lookup})"
            store = ask.cache._store
            assert isinstance(store.persistence, DiskStore)
            for key, entry in store.entries.items():  # memory, graph and file agree
                assert key in store.partitions[entry.partition].index
                assert store.persistence._file.value(key, entry.seq) is not None
    assert store is not None
    await ask.aclose()


async def test_a_row_committed_before_the_crash_is_found_after_it(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("QUESTIONS_LITERAL", repr(QUESTIONS)))
    data = tmp_path / "data"
    with anyio.fail_after(120):
        await anyio.run_process([sys.executable, str(script), str(data), "index-add"], check=False, cwd=ROOT)
    ask = make(data, max_entries=2)
    with explain() as info:
        assert await ask(PARAPHRASES[QUESTIONS[2]]) == {"q": QUESTIONS[2], "tenant": "t"}
        assert await ask(PARAPHRASES[QUESTIONS[1]]) == {"q": QUESTIONS[1], "tenant": "t"}
    assert [lookup.level for lookup in info] == ["semantic", "semantic"]
    await ask.aclose()
