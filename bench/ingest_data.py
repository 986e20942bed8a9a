"""The ingest benchmarks' job: 2,000+ real JPEGs, cached on disk, served over HTTP on 127.0.0.1.

Openclipart clip art composited on white and Noto emoji are re-encoded at random sizes (long side
300-1200 px, JPEG quality 80-95); a parquet lists url + caption (img2dataset's input format). The
server is ``bench/http_serve.py`` (``http.server`` with a production-size listen backlog) in a
subprocess, so it does not share the benchmark's GIL; both sides of a comparison fetch from it.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

CLIPART = "/usr/share/openclipart/png"


def _reencode(job: tuple[str, bytes | str, int, str]) -> tuple[str, str] | None:
    """Composite on white, resize so the long side is ``long_side``, save as JPEG; return (name, caption)."""
    from PIL import Image

    name, src, long_side, caption = job
    try:
        im = Image.open(src if isinstance(src, str) else io.BytesIO(src))
        im.draft("RGB", (long_side, long_side))
        im = im.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    except Exception:  # noqa: BLE001 - the odd unreadable clip art is simply not used
        return None
    w, h = rgb.size
    s = long_side / max(w, h)
    rgb = rgb.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    rgb.save(_OUT_DIR / name, "JPEG", quality=random.Random(name).randint(80, 95))
    return name, caption


_OUT_DIR = Path(".")


def _init(out_dir: Path) -> None:
    global _OUT_DIR
    _OUT_DIR = out_dir


def build_images(work: Path, n: int, procs: int) -> Path:
    """Create ``work/images/*.jpg`` and ``work/urls.parquet`` (captions), cached across runs."""
    img_dir, table = work / "images", work / "captions.json"
    if table.exists() and len(json.loads(table.read_text())) >= n:
        return img_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    from tessera.data_pipeline.sources.emoji_src import emoji_caption, emoji_list, render

    rng = random.Random(0)
    clip = sorted(str(p) for p in Path(CLIPART).rglob("*.png"))
    rng.shuffle(clip)
    n_emoji = n // 3
    jobs = []
    for i, e in enumerate(emoji_list(single_codepoint=False)[:n_emoji]):
        png = render(e, "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", 160, (255, 255, 255))
        if png is not None:
            jobs.append((f"emoji_{i:05d}.jpg", png, rng.randint(300, 1200), emoji_caption(e)[0]))
    for i, p in enumerate(clip[: int((n - len(jobs)) * 1.05)]):  # a few spare for unreadable files
        cap = f"a clip art of {Path(p).stem.replace('_', ' ').replace('-', ' ')}"
        jobs.append((f"clip_{i:05d}.jpg", p, rng.randint(300, 1200), cap))
    with ProcessPoolExecutor(procs, initializer=_init, initargs=(img_dir,)) as pool:
        done = [r for r in pool.map(_reencode, jobs, chunksize=16) if r is not None][:n]
    table.write_text(json.dumps(done))
    return img_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(img_dir: Path) -> Iterator[str]:
    """``bench/http_serve.py`` (http.server with a real backlog) on 127.0.0.1 in a subprocess; yields its url."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("http_serve.py")), str(port), str(img_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("HTTP server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def write_url_list(work: Path, base: str, n: int) -> Path:
    """``work/urls-N.parquet`` with ``url`` and ``caption`` columns (img2dataset's input format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = json.loads((work / "captions.json").read_text())[:n]
    if len(rows) < n:
        raise ValueError(f"{work} holds {len(rows)} images, fewer than the {n} asked for")
    path = work / f"urls-{n}.parquet"
    pq.write_table(pa.table({"url": [f"{base}/{name}" for name, _ in rows], "caption": [c for _, c in rows]}), path)
    return path
