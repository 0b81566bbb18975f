"""The disk semantic store's payloads belong to one entry of one file: an attacker with write access to the
SQLite files but without the secret (or key) cannot make one entry answer with another's payload.

Each test plays the attacker with ``sqlite3`` between two runs of an application with a secret (or encryption
keys) and checks through the public API that the planted answer is never served (the call is computed) and
that the tampered entry is counted in ``cache_info().corrupt``:

* a payload copied from another function's file into a row with the same key and sequence number;
* a whole row (with its payload) copied from another function's file;
* a payload saved before ``cache_clear()`` planted on an entry made after it and a restart, of another text or
  of the same one (a sequence number is never reused in one file, and a payload is bound to its text too);
* a payload saved from a file that was then deleted, planted on the new file's entry of the same key and
  sequence number (each file has an identity of its own).
"""

from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import cachelayers
from cachelayers import explain, semantic_cached

pytestmark = pytest.mark.anyio

SECRET = "disk-binding-secret-of-32-bytes!!"
KEYS = f"k1:{base64.b64encode(os.urandom(32)).decode()}"
PUBLIC_Q = "what are the opening hours"
ADMIN_Q = "show the root password"
SECRET_ANSWER = "ADMIN-ONLY SECRET ANSWER"
OLD_Q = "may I see the salaries of all employees"
NEW_Q = "what is the wifi password"


@pytest.fixture(params=["secret", "encryption_keys"])
def protection(request: pytest.FixtureRequest) -> dict[str, str]:
    """Signed or encrypted entries: the binding must hold either way."""
    return {"secret": SECRET} if request.param == "secret" else {"encryption_keys": KEYS}


def configure(directory: Path, protection: dict[str, str]) -> None:
    cachelayers.configure(vector_index=f"usearch://{directory}", **protection)


def functions(directory: Path, protection: dict[str, str]) -> tuple[Any, Any]:
    """Two functions of one 'process', each with its own file in one directory."""
    configure(directory, protection)

    @semantic_cached(name="binding.public_faq")
    async def public(question: str) -> str:
        return "public answer"

    @semantic_cached(name="binding.admin_tool")
    async def admin(question: str) -> str:
        return SECRET_ANSWER

    return public, admin


def asker(directory: Path, protection: dict[str, str], generation: str) -> Any:
    """One 'process' of a function that answers with its question and its ``generation``."""
    configure(directory, protection)

    @semantic_cached(name="binding.faq")
    async def ask(question: str) -> str:
        return f"{generation} answer to {question}"

    return ask


async def level_of(fn: Any, question: str) -> tuple[str, Any]:
    with explain() as info:
        answer = await fn(question)
    assert info.last is not None
    return info.last.level, answer


def file_of(directory: Path, name: str) -> Path:
    return next(p for p in directory.glob("*.sqlite") if name in p.name)


def entries(path: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT key, seq, partition, text, expires_at, vector, value FROM entries").fetchall()
    finally:
        db.close()


def delete(directory: Path, *patterns: str) -> None:
    for pattern in patterns:
        for path in directory.glob(pattern):
            path.unlink()


def execute(path: Path, sql: str, *args: Any) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute(sql, args)
        db.commit()
    finally:
        db.close()


async def one_entry_each(tmp_path: Path, protection: dict[str, str]) -> tuple[Any, Any]:
    """Store one answer with each function, close both; their rows, which share a key and sequence number."""
    public, admin = functions(tmp_path, protection)
    await public(PUBLIC_Q)
    await admin(ADMIN_Q)
    await public.aclose()
    await admin.aclose()
    (pub_row,) = entries(file_of(tmp_path, "public_faq"))
    (adm_row,) = entries(file_of(tmp_path, "admin_tool"))
    assert pub_row[:2] == adm_row[:2]  # one key and sequence number in both files
    return pub_row, adm_row


async def test_a_payload_copied_from_another_functions_file_is_refused(
        tmp_path: Path, protection: dict[str, str]) -> None:
    pub_row, adm_row = await one_entry_each(tmp_path, protection)
    execute(file_of(tmp_path, "public_faq"), "UPDATE entries SET value = ? WHERE key = ?", adm_row[6], pub_row[0])

    public, admin = functions(tmp_path, protection)
    assert await level_of(public, PUBLIC_Q) == ("computed", "public answer")
    assert public.cache_info().corrupt == 1
    assert await level_of(public, PUBLIC_Q) == ("exact", "public answer")  # stored again, sealed rightly
    await public.aclose()
    await admin.aclose()


async def test_a_whole_row_copied_from_another_functions_file_is_refused(
        tmp_path: Path, protection: dict[str, str]) -> None:
    _, adm_row = await one_entry_each(tmp_path, protection)
    execute(file_of(tmp_path, "public_faq"), "INSERT OR REPLACE INTO entries (key, seq, partition, text, expires_at, "
            "vector, value) VALUES (?, ?, ?, ?, ?, ?, ?)", *adm_row)
    delete(tmp_path, "*.usearch")

    public, admin = functions(tmp_path, protection)
    assert await level_of(public, ADMIN_Q) == ("computed", "public answer")
    assert public.cache_info().corrupt == 1  # refused when loaded, not merely out of the function's partitions
    await public.aclose()
    await admin.aclose()


@pytest.mark.parametrize("question", [NEW_Q, OLD_Q], ids=["another-text", "same-text"])
async def test_a_payload_from_before_a_clear_is_refused_after_a_restart(
        tmp_path: Path, protection: dict[str, str], question: str) -> None:
    ask = asker(tmp_path, protection, "old")
    await ask(OLD_Q)
    await ask.aclose()
    path = file_of(tmp_path, "faq")
    (old,) = entries(path)

    ask = asker(tmp_path, protection, "old")
    await ask("is the store open")
    await ask.cache_clear()
    await ask.aclose()

    ask = asker(tmp_path, protection, "new")
    assert await level_of(ask, question) == ("computed", f"new answer to {question}")
    await ask.aclose()
    (new,) = entries(path)
    execute(path, "UPDATE entries SET value = ? WHERE key = ?", old[6], new[0])

    ask = asker(tmp_path, protection, "new")
    assert await level_of(ask, question) == ("computed", f"new answer to {question}")
    assert ask.cache_info().corrupt == 1
    await ask.aclose()
    assert new[1] > old[1]  # a sequence number is never reused in one file, not even after a clear


async def test_a_payload_from_a_deleted_file_is_refused_in_its_successor(
        tmp_path: Path, protection: dict[str, str]) -> None:
    ask = asker(tmp_path, protection, "old")
    await ask(OLD_Q)
    await ask.aclose()
    path = file_of(tmp_path, "faq")
    (old,) = entries(path)
    delete(tmp_path, "*.sqlite*", "*.usearch")  # the operator deletes the files; the attacker kept the payload

    ask = asker(tmp_path, protection, "new")
    assert await level_of(ask, OLD_Q) == ("computed", f"new answer to {OLD_Q}")
    await ask.aclose()
    (new,) = entries(path)
    # The same key, sequence number, partition and text: only the new file's own identity tells them apart.
    assert new[:2] == old[:2]
    execute(path, "UPDATE entries SET value = ? WHERE key = ?", old[6], new[0])

    ask = asker(tmp_path, protection, "new")
    assert await level_of(ask, OLD_Q) == ("computed", f"new answer to {OLD_Q}")
    assert ask.cache_info().corrupt == 1
    await ask.aclose()


async def test_a_file_of_the_previous_format_is_emptied_not_served(
        tmp_path: Path, protection: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """A file of format 2 (payloads bound only to key and sequence number, no identity) is dropped on open."""
    ask = asker(tmp_path, protection, "old")
    await ask(OLD_Q)
    await ask.aclose()
    path = file_of(tmp_path, "faq")
    execute(path, "UPDATE meta SET value = '2' WHERE name = 'rows'")
    execute(path, "DROP TABLE identity")

    ask = asker(tmp_path, protection, "new")
    assert await level_of(ask, OLD_Q) == ("computed", f"new answer to {OLD_Q}")
    assert await level_of(ask, OLD_Q) == ("exact", f"new answer to {OLD_Q}")
    await ask.aclose()
    assert "older format" in caplog.text
    (row,) = entries(path)
    assert row[1] == 2  # numbered after the entries of the dropped format
