"""Weight files are data, never code: a ``.pth`` whose pickle would run a command is refused by
``torch.load(weights_only=True)`` in every loader that accepts ``.pth``, and the command never runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tessera.evaluation.inception import _load_state_dict
from tessera.evaluation.rewards import load_head_state


class _Payload:
    """Unpickling this object runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("loader", [load_head_state, _load_state_dict], ids=["aesthetic-head", "inception"])
def test_malicious_pth_is_refused_and_does_not_run(loader, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pth"
    evil.write_bytes(pickle.dumps({"layers.0.weight": _Payload(marker)}))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        loader(evil)
    assert not marker.exists()


def test_the_payload_is_real(tmp_path):
    """Control: unpickled without weights_only, the same file does run its command."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps({"w": _Payload(marker)}))
    assert marker.exists()
