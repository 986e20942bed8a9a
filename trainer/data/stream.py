"""One reader's stream: shuffle windows, one-bucket batches in the order they fill, cuts and tails.

A reader reads its pieces in order, a *window* at a time: consecutive pieces that together hold at least
``window`` samples (``LoaderConfig.shuffle_buffer``). Within a window the pieces' streams are interleaved by a
seeded random merge that keeps each piece's own order, so a batch mixes every shard of the window, as a webdataset
shuffle buffer of that size mixes the shards it holds; a window of one piece is that piece's stream. Each sample
joins its bucket's buffer and a batch is emitted when the buffer holds ``batch_size`` samples, so rare buckets
come out as soon as they fill. A reader emits at most its quota of batches per bucket (``plan.quotas``); the rest
is its leftover.

Because a piece's samples of one bucket arrive in j order, "every sample of bucket k from its i-th occurrence on"
is, per piece, a j-range: the unconsumed part of a stream after any number of batches, and its leftover, are again
pieces (``tail``), found by counting, with only the window where the cut falls simulated.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tessera.trainer.data.plan import RUN, Segment, Streams, seed_int


def windows(streams: Streams, pieces: list[list], window: int) -> list[list[list]]:
    """Consecutive pieces grouped until each group holds at least ``window`` samples (the last may hold fewer)."""
    out: list[list[list]] = []
    cur: list[list] = []
    n = 0
    for p in pieces:
        cur.append(p)
        n += streams.size(p)
        if n >= max(window, 1):
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def window_stream(streams: Streams, win: list[list], seed_parts: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4) slots of a window in stream order, and the piece (lane) each came from."""
    parts = [streams.slots(p) for p in win]
    sizes = np.array([len(p) for p in parts], np.int64)
    slots = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
    lanes = np.repeat(np.arange(len(win)), sizes)
    if len(win) == 1:
        return slots, lanes
    lanes = np.random.default_rng(seed_int(*seed_parts)).permutation(lanes)
    order = np.argsort(lanes, kind="stable")  # positions of lane 0's samples, then lane 1's, ...
    src = np.empty_like(lanes)
    src[order] = np.arange(lanes.shape[0])  # lane-major rank of each position = index into slots
    return slots[src], lanes


def _cumulative(streams: Streams, wins: list[list[list]]) -> np.ndarray:
    """(W + 1, K) occurrences of each bucket before each window."""
    c = np.zeros((len(wins) + 1, streams.buckets), np.int64)
    for i, win in enumerate(wins):
        c[i + 1] = c[i] + sum((streams.piece_counts(p) for p in win), np.zeros(streams.buckets, np.int64))
    return c


def reader_batches(streams: Streams, seg: Segment, reader: int, start: int = 0
                   ) -> Iterator[tuple[int, int, np.ndarray, int]]:
    """(batch number, bucket, (B, 4) slots, window index) of each batch the reader emits, from batch ``start``."""
    b, quota = seg.batch_size, seg.quota[reader] * seg.batch_size
    pending = [np.zeros((0, 4), np.int64) for _ in range(streams.buckets)]
    seen = np.zeros(streams.buckets, np.int64)
    wins = windows(streams, seg.pieces[reader], seg.window)
    n = 0
    for wi, win in enumerate(wins):  # windows before `start` are simulated too (numpy, no I/O): they may leave
        slots, _ = window_stream(streams, win, seg.seed_parts(reader) + (wi,))  # samples in later batches
        events = []
        for k in np.unique(slots[:, 2]).tolist():
            pos = np.nonzero(slots[:, 2] == k)[0]
            keep = pos[: max(0, int(quota[k] - seen[k]))]
            seen[k] += pos.shape[0]
            comb = np.concatenate([pending[k], slots[keep]])
            full = comb.shape[0] // b
            for i in range(full):
                events.append((int(keep[(i + 1) * b - 1 - pending[k].shape[0]]), k, comb[i * b:(i + 1) * b]))
            pending[k] = comb[full * b:]
        for _, k, sl in sorted(events, key=lambda e: e[0]):
            if n >= start:
                yield n, k, sl, wi
            n += 1


def emitted(streams: Streams, seg: Segment, reader: int, count: int) -> np.ndarray:
    """(K,) batches of each bucket the reader has emitted after its first ``count`` batches (no full simulation)."""
    b, q = seg.batch_size, seg.quota[reader]
    if count <= 0:
        return np.zeros(streams.buckets, np.int64)
    wins = windows(streams, seg.pieces[reader], seg.window)
    c = _cumulative(streams, wins)
    done = np.minimum(c // b, q)  # (W + 1, K) batches completed before each window
    wi = int(np.searchsorted(done.sum(1), count, side="left")) - 1  # the window where batch `count` completes
    if wi >= len(wins):
        raise ValueError(f"reader {reader} has {int(done[-1].sum())} batches, not {count}")
    slots, _ = window_stream(streams, wins[wi], seg.seed_parts(reader) + (wi,))
    events = []
    for k in range(streams.buckets):
        pos = np.nonzero(slots[:, 2] == k)[0]
        for i in range(int(done[wi, k]), int(done[wi + 1, k])):
            events.append((int(pos[(i + 1) * b - 1 - c[wi, k]]), k))
    out = done[wi].copy()
    for _, k in sorted(events)[: count - int(done[wi].sum())]:
        out[k] += 1
    return out


def tail(streams: Streams, seg: Segment, reader: int, start: np.ndarray) -> list[list]:
    """Pieces holding exactly the reader's samples of each bucket k from its ``start[k]``-th occurrence on."""
    wins = windows(streams, seg.pieces[reader], seg.window)
    c = _cumulative(streams, wins)
    out: list[list] = []
    for wi, win in enumerate(wins):
        lo, hi = c[wi], c[wi + 1]
        present = hi > lo
        if not (present & (start < hi)).any():
            continue
        if (start[present] <= lo[present]).all():
            out += win  # all of this window is left
            continue
        inside = np.nonzero(present & (start > lo) & (start < hi))[0]
        first_j: dict[tuple[int, int], int] = {}
        if inside.size:
            slots, lanes = window_stream(streams, win, seg.seed_parts(reader) + (wi,))
            for k in inside.tolist():
                pos = np.nonzero(slots[:, 2] == k)[0][int(start[k] - lo[k]):]  # the bucket's samples left
                for lane in np.unique(lanes[pos]).tolist():
                    first_j[(lane, k)] = int(slots[pos[lanes[pos] == lane], 3].min())
        for lane, p in enumerate(win):
            for k in np.nonzero(streams.piece_counts(p))[0].tolist():
                j0, j1 = streams.bucket_range(p, k)
                if start[k] <= lo[k]:
                    out.append([RUN, p[1], p[2], k, j0, j1])
                elif start[k] < hi[k] and (lane, k) in first_j:
                    out.append([RUN, p[1], p[2], k, first_j[(lane, k)], j1])
    return out
