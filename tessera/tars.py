"""The one reader of webdataset tars: members grouped into samples by webdataset's own key rule.

A member's key is its path up to the first dot of its basename and its extension the rest
(``dir/abc.emb.x.safetensors`` -> ``dir/abc``, ``emb.x.safetensors``): the regular expression of
``webdataset.tariterators.base_plus_ext``. A sample is a run of consecutive members with one key. As in
webdataset, names that give no key (no dot in the basename, a leading dot) and ``__meta__`` entries belong to
no sample, and a member repeated within a sample is an error.

Written here rather than read through ``webdataset``: importing webdataset imports torch (about 3 s, which
``tessera data inspect`` and the loader's workers should not pay), its readers open urls through their own
openers rather than :mod:`tessera.storage`, and the rule is one regular expression
(tests/tessera/test_tars.py checks it against webdataset's). Only bytes are returned: nothing is decoded or
unpickled here.

Python's :mod:`tarfile` ends a listing silently at a damaged header or at an end of file where a header
should be; here both are errors, so a truncated or corrupt tar raises :class:`TarReadError` naming the tar.
"""

from __future__ import annotations

import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from tessera import storage

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: archive metadata, not sample members
_CHUNK = 1 << 20


class TarReadError(tarfile.TarError):
    """A tar that cannot be read to its end as webdataset samples; the message names the tar.

    A ``tarfile.TarError``, so callers that catch those catch it too.
    """

    def __init__(self, tar_name: str, detail: str) -> None:
        super().__init__(tar_name, detail)  # both in args, so the error pickles (Ray workers raise it)
        self.tar_name, self.detail = tar_name, detail

    def __str__(self) -> str:
        return f"{self.tar_name}: unreadable tar: {self.detail}"


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name by webdataset's rule, or None if the member belongs to no sample."""
    if _META.match(name):
        return None
    m = _KEY.match(name)
    return (m.group(1), m.group(2)) if m else None


@dataclass
class Sample:
    """One sample of a tar: its key and its members by extension, in tar order."""

    key: str
    members: dict[str, bytes]  # extension as written in the tar (webdataset would lower-case it) -> bytes

    def named(self) -> list[tuple[str, bytes]]:
        """(member name, bytes) in tar order: ``KEY.ext``, exactly the names read."""
        return [(f"{self.key}.{ext}", data) for ext, data in self.members.items()]


class _StrictInfo(tarfile.TarInfo):
    """A TarInfo whose header errors after the first member are errors, not a silent end of the listing."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        """The next header, or SubsequentHeaderError (tarfile raises it as ReadError) where tarfile would stop."""
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            if tar.offset == 0:
                raise  # tarfile reports these itself at the start ("empty file", "bad checksum")
            what = "ends without its end-of-archive blocks" if isinstance(e, tarfile.EmptyHeaderError) else e
            raise tarfile.SubsequentHeaderError(f"truncated or corrupt at byte {tar.offset}: {what}") from None


def _belongs(info: tarfile.TarInfo, tar_name: str, skipped: Counter | None) -> tuple[str, str] | None:
    """(key, ext) of a member that is part of a sample; directories are skipped, other strays counted or raised."""
    if info.isdir():
        return None  # no bytes: nothing is lost
    parts = split_key(info.name) if info.isfile() else None
    if parts is None:
        reason = "member_without_key" if info.isfile() else "member_not_a_file"
        if skipped is None:
            raise TarReadError(tar_name, f"{reason.replace('_', ' ')}: {info.name!r} (not part of any sample)")
        skipped[reason] += 1
    return parts


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, tar_name: str, keep: bool) -> bytes | None:
    """The member's bytes, or None if not kept (then read in chunks and dropped, so a cut-off end still shows)."""
    f = tar.extractfile(info)
    assert f is not None  # a regular file
    if keep:
        data = f.read()
        n = len(data)
    else:
        data, n = None, 0
        while chunk := f.read(_CHUNK):
            n += len(chunk)
    if n != info.size:
        raise TarReadError(tar_name, f"member {info.name} truncated ({n} of {info.size} bytes)")
    return data


def iter_samples(f: BinaryIO, tar_name: str, *, keep: Callable[[str], bool] | None = None,
                 skipped: Counter | None = None) -> Iterator[Sample]:
    """Stream a tar (plain or compressed, never seeking) and yield its samples in order.

    ``keep(ext)`` chooses the members whose bytes are returned (default: all); the others still group (a sample
    of only dropped members is yielded empty). Members outside any sample are counted in ``skipped`` by reason,
    or raise when it is None. A read failure raises :class:`TarReadError` after every complete sample before it;
    the sample being read is not yielded.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=f, mode="r|*", tarinfo=_StrictInfo) as tar:
            for info in tar:
                parts = _belongs(info, tar_name, skipped)
                if parts is None:
                    continue
                k, ext = parts
                if k != key:
                    if key is not None:
                        yield Sample(key, members)
                    key, members, seen = k, {}, set()
                if ext in seen:
                    raise TarReadError(tar_name, f"member {info.name} appears twice in sample {k}")
                seen.add(ext)
                data = _read_member(tar, info, tar_name, keep is None or keep(ext))
                if data is not None:
                    members[ext] = data
    except TarReadError:
        raise
    except (tarfile.TarError, EOFError) as e:
        raise TarReadError(tar_name, f"{type(e).__name__}: {e}") from e
    if key is not None:
        yield Sample(key, members)


def read_samples(url: str, *, keep: Callable[[str], bool] | None = None,
                 skipped: Counter | None = None) -> Iterator[Sample]:
    """:func:`iter_samples` of the tar at a local path or ``s3://`` url (streamed, never downloaded whole)."""
    with storage.open_read(url) as f:
        yield from iter_samples(f, url, keep=keep, skipped=skipped)


def index_members(f: BinaryIO, tar_name: str, *, strict: bool = True) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> ext -> (data offset, size) of every member of a seekable, uncompressed tar; reads headers only.

    Members of one key are merged even when not adjacent (an index is looked up by key); a member repeated
    within a key, a member outside any sample, a cut-off member or (``strict``) a damaged header or missing
    end raise :class:`TarReadError`. ``strict=False`` keeps tarfile's leniency: the listing ends at the damage.
    """
    index: dict[str, dict[str, tuple[int, int]]] = {}
    end = f.seek(0, 2)
    f.seek(0)
    try:
        with tarfile.open(fileobj=f, mode="r:", tarinfo=_StrictInfo if strict else tarfile.TarInfo) as tar:
            for info in tar:
                parts = _belongs(info, tar_name, None)
                if parts is None:
                    continue
                exts = index.setdefault(parts[0], {})
                if parts[1] in exts:
                    raise TarReadError(tar_name, f"member {info.name} appears twice in sample {parts[0]}")
                if info.offset_data + info.size > end:
                    raise TarReadError(tar_name, f"member {info.name} truncated (the file ends at byte {end})")
                exts[parts[1]] = (info.offset_data, info.size)
    except TarReadError:
        raise
    except (tarfile.TarError, EOFError) as e:
        raise TarReadError(tar_name, f"{type(e).__name__}: {e}") from e
    return index
