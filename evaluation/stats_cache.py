"""A cache of FID statistics (mu, sigma; optionally the features) as pickle-free ``.npz`` files.

The key is a sha256 over (source identity, preprocessing description, network sha256): change any
of the three and the statistics are recomputed. Files are written atomically and read with
``np.load(allow_pickle=False)``; metadata is stored as a JSON string, not as an object array.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_DIR = "~/.cache/tessera/fid_stats"


def cache_key(source_identity: dict, preprocess: dict, network_sha256: str) -> str:
    """sha256 of the canonical JSON of everything the statistics depend on."""
    blob = json.dumps({"source": source_identity, "preprocess": preprocess, "network": network_sha256},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class StatsCache:
    """A directory of ``<key>.npz`` files holding ``mu`` (D,), ``sigma`` (D, D) float64 and metadata."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(os.path.expanduser(str(root if root is not None else DEFAULT_DIR)))
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        """File that holds the entry for ``key``."""
        return self.root / f"{key}.npz"

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray | None] | None:
        """``(mu, sigma, meta, features or None)`` for ``key``, or None on a miss."""
        p = self.path(key)
        if not p.is_file():
            self.misses += 1
            return None
        with np.load(p, allow_pickle=False) as z:
            mu, sigma = z["mu"], z["sigma"]
            meta = json.loads(str(z["meta_json"]))
            feats = z["features"] if "features" in z.files else None
        self.hits += 1
        return mu, sigma, meta, feats

    def put(self, key: str, mu: np.ndarray, sigma: np.ndarray, meta: dict,
            features: np.ndarray | None = None) -> Path:
        """Store an entry atomically (write to a temp file in the same dir, then rename)."""
        self.root.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
                  "meta_json": np.array(json.dumps(meta, sort_keys=True, default=str))}
        if features is not None:
            arrays["features"] = np.asarray(features, np.float32)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path(key)
