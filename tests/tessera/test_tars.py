"""tessera.tars: webdataset's key rule, streaming and indexing, and loud failures on damaged tars."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from tessera import storage, tars
from tessera.tars import TarReadError, index_members, iter_samples, read_samples, split_key


def make_tar(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    """A tar of (name, bytes) members in order; a name ending in '/' is a directory entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


FOREIGN = [  # a tar as other tools write it: directories, nested keys, multi-dot extensions, metadata, strays
    ("part0/", b""), ("part0/a.jpg", b"A"), ("part0/a.txt", b"a"), ("part0/a.seg.png", b"S"),
    ("__index__", b"meta"), ("README", b"no extension"), ("part0/b.JPG", b"B"), ("part0/b.json", b"{}"),
    ("v1.0/c.emb.t5.alt.safetensors", b"E"), ("v1.0/c.txt", b"c"), (".hidden.txt", b"dot file"), ("d.pyd", b"P"),
]


def test_split_key_is_webdatasets_rule() -> None:
    from webdataset.tariterators import base_plus_ext

    names = ["a.jpg", "dir/a.b.c", "a.b/c.d", "v1.0/c.emb.t5.alt.safetensors", "x/y/z.TXT", "abc", "abc.",
             ".hidden.txt", "dir/.hidden", "a.x/b", "a/b.c/d.e", "k.", "sp ace.jpg", "__key__.txt"]
    for name in names:
        want = base_plus_ext(name)
        assert split_key(name) == (None if want == (None, None) else want), name
    assert split_key("dir/abc.emb.x.safetensors") == ("dir/abc", "emb.x.safetensors")


def test_samples_group_like_webdataset() -> None:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    blob = make_tar(FOREIGN)
    files = ({**f, "__url__": "foreign.tar"} for f in tar_file_iterator(io.BytesIO(blob)))
    want = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in group_by_keys(files)]
    skipped: Counter = Counter()
    got = list(iter_samples(io.BytesIO(blob), "foreign.tar", skipped=skipped))
    assert [(s.key, {e.lower(): d for e, d in s.members.items()}) for s in got] == want
    assert [s.key for s in got] == ["part0/a", "part0/b", "v1.0/c", "d"]
    assert got[1].named() == [("part0/b.JPG", b"B"), ("part0/b.json", b"{}")]  # names round-trip as written
    assert skipped == {"member_without_key": 3}  # __index__, README, .hidden.txt; directories hold no bytes


def test_strays_raise_without_a_counter_and_members_may_not_repeat() -> None:
    with pytest.raises(TarReadError, match=r"foreign.tar: unreadable tar: member without key: '__index__'"):
        list(iter_samples(io.BytesIO(make_tar(FOREIGN)), "foreign.tar"))
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w") as tf:
        info = tarfile.TarInfo("k.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(TarReadError, match="link.tar: unreadable tar: member not a file: 'k.jpg'"):
        list(iter_samples(io.BytesIO(link.getvalue()), "link.tar"))
    dup = make_tar([("k.jpg", b"1"), ("k.txt", b"t"), ("k.jpg", b"2")])
    with pytest.raises(TarReadError, match="dup.tar: unreadable tar: member k.jpg appears twice in sample k"):
        list(iter_samples(io.BytesIO(dup), "dup.tar"))
    with pytest.raises(TarReadError, match="appears twice"):
        index_members(io.BytesIO(dup), "dup.tar")


def test_keep_selects_bytes_and_nothing_is_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    blob = make_tar([("k.jpg", b"img"), ("k.pyd", evil), ("k.pth", pickle.dumps({"a": 1})), ("j.txt", b"t")])
    got = list(iter_samples(io.BytesIO(blob), "t.tar", keep=lambda ext: ext == "jpg"))
    assert [(s.key, s.members) for s in got] == [("k", {"jpg": b"img"}), ("j", {})]
    everything = list(iter_samples(io.BytesIO(blob), "t.tar"))
    assert everything[0].members["pyd"] == evil and not marker.exists()


def test_compressed_tars_stream() -> None:
    blob = make_tar([("k.jpg", b"1" * 5000), ("k.txt", b"t")], mode="w:gz")
    assert [s.members for s in iter_samples(io.BytesIO(blob), "k.tar.gz")] == [{"jpg": b"1" * 5000, "txt": b"t"}]
    with pytest.raises(TarReadError, match=r"k.tar.gz: unreadable tar"):
        list(iter_samples(io.BytesIO(blob[: len(blob) // 2]), "k.tar.gz"))


def _damaged() -> dict[str, bytes]:
    """One tar damaged in each way tarfile alone would read as a shorter, valid-looking archive (or fail)."""
    blob = make_tar([("a.jpg", b"x" * 3000), ("a.txt", b"t"), ("b.jpg", b"y" * 2000), ("b.json", b"{}")])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        header = {m.name: m.offset for m in tf}
    bad_header = bytearray(blob)
    bad_header[header["b.jpg"] + 10] ^= 0xFF
    return {"cut in a member": blob[:1000], "cut in a header": blob[: header["b.jpg"] + 100],
            "cut before a header": blob[: header["b.jpg"]], "cut in a skipped member": blob[: header["b.json"] - 700],
            "bad header": bytes(bad_header), "empty": b"", "not a tar": b"hello world " * 100}


@pytest.mark.parametrize("damage", list(_damaged()))
def test_damaged_tars_raise_naming_the_tar(damage: str) -> None:
    data = _damaged()[damage]
    with pytest.raises(TarReadError, match=r"^shards/00003.tar: unreadable tar: "):
        list(iter_samples(io.BytesIO(data), "shards/00003.tar", keep=lambda ext: ext != "jpg"))
    with pytest.raises(TarReadError, match=r"^shards/00003.tar: unreadable tar: ") as err:
        index_members(io.BytesIO(data), "shards/00003.tar")
    assert isinstance(err.value, tarfile.TarError)  # existing `except tarfile.TarError` clauses still catch it
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # crosses Ray's process boundary


def test_lenient_index_ends_at_a_damaged_header() -> None:
    """strict=False is tarfile's own reading (the loader's verify="never"): the listing stops at the damage."""
    index = index_members(io.BytesIO(_damaged()["bad header"]), "t.tar", strict=False)
    assert {k: list(v) for k, v in index.items()} == {"a": ["jpg", "txt"]}
    with pytest.raises(TarReadError, match="truncated"):  # a cut-off member is an error either way
        index_members(io.BytesIO(_damaged()["cut in a member"]), "t.tar", strict=False)


def test_complete_samples_before_a_failure_are_yielded() -> None:
    blob = make_tar([("a.jpg", b"1"), ("a.txt", b"a"), ("b.jpg", b"2" * 3000)])
    seen = []
    with pytest.raises(TarReadError):
        for s in iter_samples(io.BytesIO(blob[:3500]), "t.tar"):  # inside b.jpg's data
            seen.append(s.key)
    assert seen == ["a"]  # b was being read: not yielded


def test_index_members_points_at_the_bytes(tmp_path: Path) -> None:
    members = [("a.jpg", b"A" * 700), ("a.json", b"{}"), ("b.jpg", b"B"), ("a.txt", b"late")]
    path = tmp_path / "t.tar"
    path.write_bytes(make_tar(members))
    with open(path, "rb") as f:
        index = index_members(f, str(path))
    data = path.read_bytes()
    assert {k: list(v) for k, v in index.items()} == {"a": ["jpg", "json", "txt"], "b": ["jpg"]}
    for name, payload in members:
        off, n = index[name.split(".")[0]][name.split(".", 1)[1]]
        assert data[off:off + n] == payload


@pytest.mark.s3
def test_read_samples_streams_local_and_s3(tmp_path: Path, s3_bucket: str) -> None:
    blob = make_tar([("k1.jpg", b"1"), ("k1.txt", b"one"), ("k2.jpg", b"2")])
    for url in (str(tmp_path / "a.tar"), storage.join(s3_bucket, "wds", "a.tar")):
        storage.write_bytes(url, blob)
        assert [(s.key, s.members) for s in read_samples(url)] == [("k1", {"jpg": b"1", "txt": b"one"}),
                                                                  ("k2", {"jpg": b"2"})]
        storage.write_bytes(url, blob[:700])
        with pytest.raises(TarReadError, match=f"^{url}: unreadable tar: "):
            list(tars.read_samples(url))
