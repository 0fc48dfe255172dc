"""Blob storage: keys come only from valid UIDs (PS3.5 §9.1), and writes are atomic."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidInstance, OutOfResources
from gateway.storage import FileStorage, instance_key, is_valid_uid

UID_ALPHABET = st.sampled_from(list("0123456789./\\\x00a %"))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.text(), st.text(UID_ALPHABET), st.from_regex(r"[0-9.]{1,70}")),
                min_size=3, max_size=3))
def test_any_uid_string_yields_a_path_inside_the_root_or_is_rejected(
        tmp_path_factory: pytest.TempPathFactory, uids: list[str]) -> None:
    root = tmp_path_factory.getbasetemp() / "hypothesis-root"
    storage = FileStorage(root, fsync=False)
    try:
        key = instance_key(*uids)
    except InvalidInstance:
        assert not all(is_valid_uid(u) for u in uids)
        return
    path = storage.path_for(key)
    assert path.is_relative_to(storage.root)
    assert path.parent.parent.parent == storage.root
    assert path.name == f"{uids[2]}.dcm"


@pytest.mark.parametrize("uid, valid", [
    ("1.2.840.10008.1.2.1", True), ("0", True), ("1.0.3", True),
    ("1.02.3", False), ("1..2", False), (".1.2", False), ("1.2.", False), ("", False),
    ("1." + "1" * 63, False), ("1.2.abc", False), ("1.2 ", False), ("../1", False),
])
def test_uid_syntax_follows_ps3_5_section_9_1(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_put_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "root")
    key = instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5")
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    storage.put_file(key, first, move=False)
    storage.put_file(key, second, move=True)
    assert storage.path_for(key).read_bytes() == b"second"
    assert list(storage.staging_dir().iterdir()) == []
    assert list(storage.keys()) == [key]
    assert first.exists() and not second.exists()  # copied vs taken over


def test_write_errors_become_out_of_resources(tmp_path: Path) -> None:
    """A failing file system (here: the staging directory is gone and a file sits in its
    place) surfaces as 0xA700, never as a crash or a partial blob."""
    storage = FileStorage(tmp_path / "root")
    staging = storage.staging_dir()
    staging.rmdir()
    staging.write_text("not a directory")
    key = instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5")
    with pytest.raises(OutOfResources) as raised:
        source = tmp_path / "source"
        source.write_bytes(b"data")
        storage.put_file(key, source, move=False)
    assert raised.value.status == 0xA700
    assert not storage.path_for(key).exists()


def test_path_for_refuses_keys_that_are_not_instance_keys(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "root")
    for key in ("../x.dcm", "1/2/../../../x.dcm", "/etc/passwd", "1.2/3.4/5.6.txt"):
        with pytest.raises(ValueError):
            storage.path_for(key)
