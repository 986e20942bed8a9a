"""Each source yields the expected RawSamples, deterministically partitioned."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.data_pipeline.process import ProcessConfig, SampleProcessor
from tessera.data_pipeline.sample import Processed
from tessera.data_pipeline.sources import (SOURCES, FolderSourceConfig, OpenclipartSourceConfig, Partition,
                                           SourceConfig, UrlsSourceConfig, build_source)
from tessera.data_pipeline.sources.emoji_src import emoji_id, emoji_list
from tessera.data_pipeline.sources.http import opted_out
from tessera.data_pipeline.sources.openclipart import clean_title, openclipart_caption
from tessera.config import ConfigError, from_dict
from tessera.registry import RegistryError
from tessera.data_pipeline.ingest import IngestConfig
from tests.data_pipeline.conftest import image_bytes


def read_all(cfg: SourceConfig, per_part: int = 2) -> tuple[list[Partition], list]:
    src = build_source(cfg)
    parts = src.partitions(per_part)
    return parts, [s for p in parts for s in src.read(p)]


def _rows(srv) -> list[dict]:
    rows = []
    for i in range(5):
        url = srv.add(f"/img{i}.jpg", image_bytes((200 + 10 * i, 160), seed=i))
        rows.append({"URL": url, "TEXT": f"caption {i}", "width": 200 + 10 * i, "license": "cc0"})
    return rows


def _write_table(rows: list[dict], path: Path) -> None:
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups
        return
    if name.endswith(".arrow"):
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_file(str(path), table.schema) as w:
            for batch in table.to_batches(max_chunksize=2):
                w.write_batch(batch)
        return
    if name.endswith((".csv", ".tsv")):
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="\t" if name.endswith(".tsv") else ",")
        w.writeheader()
        w.writerows(rows)
        text = buf.getvalue()
    elif name.endswith(".json"):
        text = json.dumps(rows, indent=1)  # one JSON array, over many lines
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())


FORMATS = ["parquet", "arrow", "csv", "tsv", "tsv.gz", "json", "jsonl", "jsonl.gz"]


@pytest.mark.parametrize("ext", FORMATS)
def test_urls_source_formats(http_server, tmp_path: Path, ext: str) -> None:
    rows = _rows(http_server)
    table = tmp_path / f"part0.{ext}"
    _write_table(rows, table)
    cfg = SourceConfig(name="urls", path=str(table), urls=UrlsSourceConfig(url_col="URL", caption_col="TEXT", threads=4,
                                                                           user_agent="tessera-test/1.0"))
    parts, samples = read_all(cfg)
    assert [p.payload["start"] for p in parts] == [0, 2, 4] and [p.index for p in parts] == [0, 1, 2]
    assert [s.source_id for s in samples] == [f"urls:part0.{ext}:{i}" for i in range(5)]  # input order
    for i, s in enumerate(samples):
        assert s.error is None and s.data == http_server.routes[f"/img{i}.jpg"].body
        assert s.caption == f"caption {i}"
        assert s.meta == {"url": rows[i]["URL"], "width": 200 + 10 * i, "license": "cc0"}
    assert set(http_server.user_agents) == {"tessera-test/1.0"}
    # extra_cols limits the kept columns; limit truncates the input
    cfg2 = SourceConfig(name="urls", path=str(table), limit=3,
                        urls=UrlsSourceConfig(url_col="URL", caption_col="TEXT", extra_cols=["license"]))
    parts2, samples2 = read_all(cfg2, per_part=10)
    assert len(parts2) == 1 and len(samples2) == 3 and samples2[0].meta == {"url": rows[0]["URL"], "license": "cc0"}


def test_urls_txt_is_one_url_per_line_and_json_is_an_array(http_server, tmp_path: Path) -> None:
    urls = [http_server.add(f"/t{i}.jpg", image_bytes(seed=i)) for i in range(3)]
    (tmp_path / "list.txt").write_text("\n".join(urls) + "\n")
    _, samples = read_all(SourceConfig(name="urls", path=str(tmp_path / "list.txt")), per_part=2)
    assert [(s.source_id, s.error, s.caption) for s in samples] == [(f"urls:list.txt:{i}", None, None)
                                                                    for i in range(3)]
    assert [s.meta["url"] for s in samples] == urls
    (tmp_path / "lines.json").write_text("".join(json.dumps({"url": u, "caption": "c"}) + "\n" for u in urls))
    with pytest.raises(ValueError, match="lines.json: a .json table must be one JSON array"):
        build_source(SourceConfig(name="urls", path=str(tmp_path / "lines.json"))).partitions(10)
    (tmp_path / "arr.json").write_text(json.dumps([{"url": urls[0], "caption": "c"}, 7, {"url": urls[1]}]))
    _, samples = read_all(SourceConfig(name="urls", path=str(tmp_path / "arr.json")), per_part=10)
    assert [s.error for s in samples] == [None, "bad_row", None]


def test_urls_directory_of_tables_and_bad_rows(http_server, tmp_path: Path) -> None:
    good = http_server.add("/ok.png", image_bytes(fmt="PNG"))
    (tmp_path / "a.jsonl").write_text(json.dumps({"url": good, "caption": "x"}) + "\n{not json\n\n[1]\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"url": "", "caption": "no url"}) + "\n")
    _, samples = read_all(SourceConfig(name="urls", path=str(tmp_path)), per_part=100)
    assert [(s.source_id, s.error) for s in samples] == [
        ("urls:a.jsonl:0", None), ("urls:a.jsonl:1", "bad_row"), ("urls:a.jsonl:2", "bad_row"),
        ("urls:b.jsonl:0", "missing_url"),
    ]  # fmt: skip


def test_urls_missing_column_is_clear(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("link,caption\nhttp://x,y\n")
    with pytest.raises(ValueError, match="no column 'url'"):
        build_source(SourceConfig(name="urls", path=str(tmp_path / "t.csv"))).partitions(10)


def test_http_retries_then_succeeds(http_server, tmp_path: Path) -> None:
    url = http_server.add("/flaky.jpg", image_bytes(), fail_first=2)
    _write_table([{"url": url, "caption": "c"}], tmp_path / "t.parquet")
    cfg = SourceConfig(name="urls", path=str(tmp_path / "t.parquet"), urls=UrlsSourceConfig(retries=2, backoff_s=0.01))
    _, samples = read_all(cfg)
    assert samples[0].error is None and http_server.hits["/flaky.jpg"] == 3
    http_server.hits.clear()
    _, samples = read_all(SourceConfig(name="urls", path=str(tmp_path / "t.parquet"),
                                       urls=UrlsSourceConfig(retries=1, backoff_s=0.01)))
    assert samples[0].error == "http_503" and http_server.hits["/flaky.jpg"] == 2


def test_optout_header_parsing() -> None:
    """img2dataset's rule and default directives (noai, noimageai, noindex, noimageindex), one header at a time."""
    assert opted_out("noai", "tessera") and opted_out("noindex, nofollow", "tessera")
    assert opted_out("tessera: noimageindex", "tessera") and not opted_out("otherbot: noai", "tessera")
    assert opted_out(["otherbot: noai", "noimageai"], "tessera")  # the second header addresses every crawler
    assert not opted_out(["otherbot: noai, noindex"], "tessera")  # the whole header addresses otherbot
    assert not opted_out("nofollow, nosnippet", "tessera") and not opted_out(None, "tessera")
    assert opted_out("nosnippet", "tessera", ["nosnippet"])


def test_optout_headers_reject_by_default_and_by_configured_directives(http_server, tmp_path: Path) -> None:
    img = image_bytes()
    rows = [{"url": http_server.add("/a.jpg", img, headers={"X-Robots-Tag": "noindex"}), "caption": "a"},
            {"url": http_server.add("/b.jpg", img, headers={"X-Robots-Tag": "tessera: nosnippet"}), "caption": "b"},
            {"url": http_server.add("/c.jpg", img, headers={"X-Robots-Tag": "otherbot: noai"}), "caption": "c"}]
    _write_table(rows, tmp_path / "t.parquet")
    _, plain = read_all(SourceConfig(name="urls", path=str(tmp_path / "t.parquet")), per_part=10)
    assert [s.error for s in plain] == ["opt_out", None, None]
    _, extra = read_all(SourceConfig(name="urls", path=str(tmp_path / "t.parquet"),
                                     urls=UrlsSourceConfig(extra_optout_directives=["nosnippet"])), per_part=10)
    assert [s.error for s in extra] == ["opt_out", "opt_out", None]
    _, off = read_all(SourceConfig(name="urls", path=str(tmp_path / "t.parquet"),
                                   urls=UrlsSourceConfig(respect_optout=False)), per_part=10)
    assert [s.error for s in off] == [None, None, None]


def test_folder_source_sidecars(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.jpg").write_bytes(image_bytes(seed=1))
    (tmp_path / "b.txt").write_bytes("caption b \u00e9".encode())
    (tmp_path / "a.png").write_bytes(image_bytes(fmt="PNG", seed=2))
    (tmp_path / "a.json").write_text(json.dumps({"caption": "caption a", "author": "me", "captions": {"long": "L"}}))
    (tmp_path / "sub" / "c.webp").write_bytes(image_bytes(fmt="WEBP", seed=3))
    (tmp_path / "notes.md").write_text("ignored")
    parts, samples = read_all(SourceConfig(name="folder", path=str(tmp_path)), per_part=2)
    assert len(parts) == 2
    assert [s.source_id for s in samples] == ["folder:a.png", "folder:b.jpg", "folder:sub/c.webp"]
    a, b, c = samples
    assert a.caption == "caption a" and a.meta["author"] == "me" and a.meta["captions"] == {"long": "L"}
    assert b.caption == "caption b \u00e9".encode() and b.meta["path"] == str(tmp_path / "b.jpg")
    assert c.caption is None  # no sidecar -> rejected later as caption_missing
    out = SampleProcessor(ProcessConfig()).process(c)
    assert out.reason == "caption_missing"


def test_folder_source_captions_csv(tmp_path: Path) -> None:
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for n in ("x.jpg", "y.jpg"):
        (img_dir / n).write_bytes(image_bytes())
    (tmp_path / "caps.csv").write_text("file,caption\nx.jpg,the x\ny.jpg,\"the y, quoted\"\n")
    _, samples = read_all(SourceConfig(name="folder", path=str(img_dir),
                                       folder=FolderSourceConfig(captions_csv=str(tmp_path / "caps.csv"))))
    assert [s.caption for s in samples] == ["the x", "the y, quoted"]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_source(tmp_path: Path) -> None:
    meta = {"key": "k1", "source_id": "urls:t:1", "url": "http://old/1.jpg", "sha256": "x", "bucket": "1x1",
            "captions": {"alt": "alt caption", "long": "a long one"}, "meta": {"license": "cc0"}}  # fmt: skip
    _tar(tmp_path / "00000.tar", [
        ("k1.jpg", image_bytes(seed=1)), ("k1.txt", b"txt caption"), ("k1.json", json.dumps(meta).encode()),
        ("k1.emb.t5.alt.safetensors", b"\x00" * 16),
        ("k2.png", image_bytes(fmt="PNG", seed=2)), ("k2.json", b'{"caption": "json caption"}'),
        ("k3.pyd", b"cos\nsystem\n(S'echo pwned'\ntR."),  # a pickle: must never be loaded
    ])  # fmt: skip
    _tar(tmp_path / "00001.tar", [("dir/k4.webp", image_bytes(fmt="WEBP")), ("dir/k4.txt", b"four")])
    parts, samples = read_all(SourceConfig(name="webdataset", path=str(tmp_path)))
    assert [p.payload["rel"] for p in parts] == ["00000.tar", "00001.tar"]
    by_id = {s.source_id: s for s in samples}
    assert list(by_id) == ["webdataset:00000.tar:k1", "webdataset:00000.tar:k2", "webdataset:00000.tar:k3",
                           "webdataset:00001.tar:dir/k4"]  # fmt: skip
    k1 = by_id["webdataset:00000.tar:k1"]
    assert k1.caption == b"txt caption" and k1.meta["captions"]["long"] == "a long one"
    assert k1.meta["orig_source_id"] == "urls:t:1" and k1.meta["license"] == "cc0" and "sha256" not in k1.meta
    assert by_id["webdataset:00000.tar:k2"].caption == "json caption"
    assert by_id["webdataset:00000.tar:k3"].error == "no_image"
    assert by_id["webdataset:00001.tar:dir/k4"].caption == b"four"


def test_webdataset_truncated_tar_is_counted(tmp_path: Path) -> None:
    _tar(tmp_path / "a.tar", [("k1.jpg", image_bytes()), ("k1.txt", b"one"), ("k2.jpg", image_bytes(seed=9))])
    blob = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(blob[: len(blob) // 2])
    _, samples = read_all(SourceConfig(name="webdataset", path=str(tmp_path / "a.tar")))
    assert samples[-1].error == "read_error"


def test_webdataset_members_outside_any_sample_are_logged_not_inputs(tmp_path: Path, caplog) -> None:
    _tar(tmp_path / "a.tar", [("README", b"about"), ("k1.jpg", image_bytes()), ("k1.txt", b"one")])
    _, samples = read_all(SourceConfig(name="webdataset", path=str(tmp_path / "a.tar")))
    assert [(s.source_id, s.error) for s in samples] == [("webdataset:a.tar:k1", None)]
    assert "skipped 1 member(s) outside any sample: {'member_without_key': 1}" in caplog.text


def test_emoji_source() -> None:
    parts, samples = read_all(SourceConfig(name="emoji", limit=6), per_part=4)
    assert len(parts) == 2 and len(samples) == 6
    assert [s.source_id for s in samples] == [f"emoji:{emoji_id(e)}" for e in emoji_list()[:6]]
    assert all(s.error is None and s.caption.endswith(" emoji") for s in samples)
    src = build_source(SourceConfig(name="emoji"))
    boar = src.items.index("\U0001f417")
    (s,) = src.read(Partition("emoji", 0, {"start": boar, "end": boar + 1}))
    assert s.source_id == "emoji:1f417" and s.caption == "a boar emoji" and s.data[:4] == b"\x89PNG"
    out = SampleProcessor(ProcessConfig()).process(s)
    assert isinstance(out, Processed) and out.bucket == "256x256" and out.meta["captions"]["name"] == "boar"
    # A glyph newer than the installed font is counted as glyph_missing, not skipped.
    new = src.items.index("\U0001fae9")  # face with bags under eyes (Emoji 16.0)
    (m,) = src.read(Partition("emoji", 0, {"start": new, "end": new + 1}))
    assert m.error == "glyph_missing" and m.data is None


def test_openclipart_source_and_captions() -> None:
    parts, samples = read_all(SourceConfig(name="openclipart", limit=40,
                                           openclipart=OpenclipartSourceConfig(categories=["food"])), per_part=16)
    assert len(parts) == 3 and len(samples) == 40
    assert all(s.source_id.startswith("openclipart:food/") and s.caption.startswith("clip art of ") for s in samples)
    outs = SampleProcessor(ProcessConfig()).process_batch(samples)
    written = [o for o in outs if isinstance(o, Processed)]
    assert len(written) >= 30 and len({o.bucket for o in written}) >= 3  # varied aspect ratios


@pytest.mark.parametrize("rel,caption", [
    ("animals/mammals/horses/cavallo_architetto_franc_05.png", "clip art of cavallo, horses, mammals"),
    ("science/astronomy/the_moon_dan_gerhards_01.png", "clip art of the moon, astronomy, science"),
    ("animals/mammals/big_cats/tiger_graig_ryan_smith_-_01.png", "clip art of tiger, big cats, mammals"),
    ("food/fruit/melon_goneri_le_bouder_01.png", "clip art of melon, fruit, food"),
    ("animals/bugs/damselfly_leigh_purdie_r.png", "clip art of damselfly, bugs, animals"),
    ("science/double_helix_anthony_lie_01.png", "clip art of double helix, science"),
    ("recreation/party/fireworks_ganson1.png", "clip art of fireworks, party, recreation"),
    ("food/spaghetti_bw.png", "clip art of spaghetti black and white, food"),
    ("signs_and_symbols/flags/america/national_flag_of_canada1.png",
     "clip art of national flag of canada1, america, flags"),
    ("unsorted/festoni.png", "clip art of festoni"),
])  # fmt: skip
def test_openclipart_caption_rule(rel: str, caption: str) -> None:
    assert Path("/usr/share/openclipart/png", rel).is_file()  # real examples from the package
    assert openclipart_caption(rel) == caption


def test_clean_title_keeps_non_trailing_names() -> None:
    assert clean_title("park_bench_01") == "park bench" and clean_title("dan_gerhards_01") == ""


def test_builtin_sources_name_missing_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="openclipart-png"):
        build_source(SourceConfig(name="openclipart", path=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        build_source(SourceConfig(name="emoji", path=str(tmp_path / "nope.ttf")))


def test_source_config_is_strict() -> None:
    assert SOURCES.names() == ["emoji", "folder", "openclipart", "urls", "webdataset"]
    with pytest.raises(ConfigError, match="url_colum"):
        from_dict(SourceConfig, {"name": "urls", "path": "x", "urls": {"url_colum": "u"}})
    with pytest.raises(ConfigError, match="path is required"):
        from_dict(SourceConfig, {"name": "folder"})
    with pytest.raises(RegistryError, match="unknown source .ftp."):
        build_source(from_dict(SourceConfig, {"name": "ftp", "path": "x"}))
    with pytest.raises(ConfigError, match="section.s. emoji set but name is 'urls'"):
        from_dict(SourceConfig, {"name": "urls", "path": "x", "emoji": {"canvas": 200}})
    with pytest.raises(ConfigError, match="options is for plugin sources"):
        from_dict(SourceConfig, {"name": "emoji", "options": {"a": 1}})
    cfg = from_dict(SourceConfig, {"name": "urls", "path": "x", "urls": {"url_col": "URL"}})
    assert cfg.section().url_col == "URL" and cfg.section().caption_col == "caption"


def test_old_flat_source_configs_get_an_error_that_says_what_to_write() -> None:
    """Configs written before sources had sections: ``kind:`` and flat options are refused with the new spelling."""
    with pytest.raises(ConfigError, match=r"'kind: emoji' is now 'name: emoji'.*emoji: \{canvas: 160\}"):
        from_dict(SourceConfig, {"kind": "emoji", "limit": 4})
    with pytest.raises(ConfigError, match=r"sources\[0\]\.url_col.*moved into the source's section: urls: \{url_col"):
        from_dict(IngestConfig, {"sources": [{"kind": "urls", "path": "x", "url_col": "URL"}], "output": "o"})
    with pytest.raises(ConfigError, match=r"emoji_canvas.*emoji: \{canvas"):
        from_dict(SourceConfig, {"kind": "emoji", "emoji_canvas": 200})


def test_http_retries_honour_retry_after_capped_and_jittered_backoff(http_server, tmp_path: Path) -> None:
    """urllib3's Retry under the source: a 503 with Retry-After waits what the server asked (up to the cap), and
    backoff without one is exponential with jitter; the retries are counted on the result."""
    import time as _time

    from tessera.data_pipeline.sources.http import Downloader, retry_policy

    body = image_bytes()
    url = http_server.add("/after.jpg", body, fail_first=1, fail_headers={"Retry-After": "1"})
    dl = Downloader(UrlsSourceConfig(retries=2, backoff_s=0.01, backoff_jitter_s=0.0))
    t0 = _time.monotonic()
    res = dl.fetch(url)
    waited = _time.monotonic() - t0
    assert res.error is None and res.data == body and res.retries == 1 and http_server.hits["/after.jpg"] == 2
    assert waited >= 0.95, f"Retry-After: 1 was not honoured (answered after {waited:.2f} s)"
    capped = http_server.add("/long.jpg", body, fail_first=1, fail_headers={"Retry-After": "4"})
    dl = Downloader(UrlsSourceConfig(retries=1, backoff_s=0.01, max_retry_after_s=0.2))
    t0 = _time.monotonic()
    assert dl.fetch(capped).error is None and _time.monotonic() - t0 < 2.5, "Retry-After was not capped at 0.2 s"
    policy = retry_policy(UrlsSourceConfig(retries=5, backoff_s=0.5, backoff_jitter_s=0.25))
    assert policy.status_forcelist == (429, 500, 502, 503, 504) and policy.respect_retry_after_header
    for _ in range(3):  # exponential backoff with jitter: 0.5 * 2**(n-1) + U(0, 0.25)
        policy = policy.increment("GET", "/x", error=ConnectionError("refused"))
    waits = {round(policy.get_backoff_time(), 3) for _ in range(20)}
    assert len(waits) > 1 and all(2.0 <= w <= 2.25 for w in waits), waits


@pytest.mark.s3
def test_sources_read_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    from tessera import storage

    tar = tmp_path / "00000.tar"
    _tar(tar, [("k1.jpg", image_bytes(seed=1)), ("k1.txt", b"one"), ("k2.png", image_bytes(fmt="PNG")),
               ("k2.txt", b"two")])  # fmt: skip
    storage.write_bytes(f"{s3_bucket}/wds/00000.tar", tar.read_bytes())
    img = image_bytes(seed=3)
    storage.write_bytes(f"{s3_bucket}/imgs/a.jpg", img)
    storage.write_bytes(f"{s3_bucket}/imgs/a.txt", b"caption a")
    _write_table([{"url": f"{s3_bucket}/imgs/a.jpg", "caption": "c", "x": 1}], tmp_path / "t.parquet")
    storage.write_bytes(f"{s3_bucket}/tables/t.parquet", (tmp_path / "t.parquet").read_bytes())

    _, wds = read_all(SourceConfig(name="webdataset", path=f"{s3_bucket}/wds"))
    assert [(s.source_id, s.caption) for s in wds] == [("webdataset:00000.tar:k1", b"one"),
                                                       ("webdataset:00000.tar:k2", b"two")]  # fmt: skip
    _, folder = read_all(SourceConfig(name="folder", path=f"{s3_bucket}/imgs"))
    assert [(s.source_id, s.data, s.caption) for s in folder] == [("folder:a.jpg", img, b"caption a")]
    _, urls = read_all(SourceConfig(name="urls", path=f"{s3_bucket}/tables"))
    assert urls[0].error is None and urls[0].data == img and urls[0].meta["x"] == 1


@pytest.mark.s3
def test_urls_parquet_is_read_by_row_groups_and_columns(s3_bucket: str, tmp_path: Path, monkeypatch) -> None:
    """On S3 (bytes counted by the server): counting rows reads the footer, a partition the two row groups it
    overlaps and its two columns -- not the 500-byte blob column, not the other six row groups."""
    from tessera import storage
    from tessera.data_pipeline.sources.urls import Table
    from tests.trainer.data.s3_counting import CountingS3

    n = 8000
    blob = [bytes(np.random.default_rng(i).integers(0, 256, 500, dtype=np.uint8)) for i in range(n)]
    table = pa.table({"url": [f"http://img/{i}.jpg" for i in range(n)], "caption": [f"c{i}" for i in range(n)],
                      "blob": blob})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=1000)
    url = f"{s3_bucket}/t.parquet"
    storage.write_bytes(url, (tmp_path / "t.parquet").read_bytes())
    size = (tmp_path / "t.parquet").stat().st_size
    srv = CountingS3().start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", srv.endpoints[0])
        storage.configure(storage.StorageConfig())
        t = Table(url, "parquet", UrlsSourceConfig(extra_cols=[]))
        assert t.count() == n
        footer = srv.traffic.bytes_of("/" + url[len("s3://"):])
        rows = list(t.rows(2500, 3500))
        read = srv.traffic.bytes_of("/" + url[len("s3://"):]) - footer
    finally:
        srv.stop()
        storage.configure(storage.StorageConfig())
    assert rows == [{"url": f"http://img/{i}.jpg", "caption": f"c{i}"} for i in range(2500, 3500)]
    assert footer < 0.02 * size and read < 0.1 * size, (footer, read, size)
