"""Reading `torch.save` files without torch (`hiera_jax.weights.torch_pickle`), and refusing unsafe ones.

Files are written by the real `torch.save` and every array is compared exactly with torch's own
values; malicious pickles are built by hand and must be refused before anything in them runs.
"""

import io
import os
import pickle
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from hiera_jax.weights.formats import read_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "convert", "convert_pytorch.py")


def _torch():
    return pytest.importorskip("torch")


def _expected(tensor) -> np.ndarray:
    torch = _torch()
    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _assert_same(loaded: dict, tensors: dict) -> None:
    assert list(loaded) == list(tensors)
    for key, tensor in tensors.items():
        expected = _expected(tensor)
        actual = loaded[key]
        assert isinstance(actual, np.ndarray), key
        assert actual.dtype == expected.dtype, (key, actual.dtype, expected.dtype)
        assert actual.shape == expected.shape, (key, actual.shape, expected.shape)
        np.testing.assert_array_equal(actual, expected, err_msg=key)
        assert actual.flags.writeable, key


def _many_tensors() -> dict:
    torch = _torch()
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    return {
        "bf16": torch.randn(4, 5, generator=gen).bfloat16(),
        "f16": torch.randn(3, 2, generator=gen).half(),
        "f32": torch.randn(2, 3, 4, generator=gen),
        "f64": torch.randn(5, generator=gen).double(),
        "i64": torch.arange(-3, 9),
        "i32": torch.tensor([1 << 30, -5], dtype=torch.int32),
        "i16": torch.tensor([-7, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "transposed": base.t(),  # non-contiguous: strides (1, 8)
        "stepped": base[1::2, ::3],  # storage offset and strides (16, 3)
        "shared_whole": base,  # these three view one storage
        "shared_row": base[2],
        "bf16_stepped": torch.randn(4, 6, generator=gen).bfloat16()[:, 1::2],
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.randn(2, generator=gen)),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_official_wrapper_every_dtype_and_layout(tmp_path, legacy):
    torch = _torch()
    tensors = _many_tensors()
    path = tmp_path / "hiera_base_224.pth"
    torch.save(
        {"model_state": tensors, "epoch": 7}, path, _use_new_zipfile_serialization=not legacy
    )
    assert zipfile.is_zipfile(path) != legacy
    state, hf_config = read_state_dict(str(path))
    assert hf_config is None and state["epoch"] == 7
    _assert_same(state["model_state"], tensors)
    assert state["model_state"]["bf16"].dtype == np.float32  # bfloat16 comes back as float32
    # Tensors that shared a storage come back as independent copies.
    state["model_state"]["shared_row"][:] = 0
    assert state["model_state"]["shared_whole"][2].any()


def test_timm_bare_state_dict_any_folder_name(tmp_path):
    torch = _torch()
    head = torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 3)})
    tensors = torch.nn.ModuleDict({"head": head}).state_dict()  # an OrderedDict with _metadata
    saved = tmp_path / "model_best.pth.tar"
    torch.save(tensors, saved)  # as timm's train.py; the zip's folder is named after the file
    path = tmp_path / "renamed.bin"
    os.rename(saved, path)
    folders = {name.split("/")[0] for name in zipfile.ZipFile(path).namelist()}
    assert len(folders) == 1 and folders != {"renamed"}
    state = read_state_dict(str(path))[0]
    assert type(state) is dict and list(state) == ["head.fc.weight", "head.fc.bias"]
    _assert_same(state, tensors)


def test_not_a_dict(tmp_path):
    torch = _torch()
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a ndarray, not a state dict"):
        read_state_dict(str(tmp_path / "tensor.pt"))


# ---------------------------------------------------------------------- malicious pickles
class _Payload:
    """Pickles as a call of `func(*args)`: what a malicious checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _torch_like_zip(path, obj) -> None:
    """A zip laid out as torch.save writes it, holding `obj` pickled with protocol 2."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())


def _payloads(marker):
    import subprocess as sp

    return {
        f"{os.system.__module__}.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(sp.Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("layout", ["zip", "bare pickle", "legacy header"])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["os.system", "eval", "Popen"])
def test_malicious_pickles_are_refused_without_running(tmp_path, layout, which):
    marker = tmp_path / "pwned"
    name, payload = list(_payloads(marker).items())[which]
    state = {"blocks.0.norm1.weight": [1.0, 2.0], "evil": payload}
    path = tmp_path / "evil.pth"
    if layout == "zip":
        _torch_like_zip(path, state)
    elif layout == "bare pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:  # the legacy format's header pickles, then the payload where the state dict goes
        header = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}]
        path.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in [*header, state]))
    message = (
        f"{path} is not a plain PyTorch state dict: it references {name}, which is refused "
        "(loading it could run code)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        read_state_dict(str(path))
    assert not marker.exists()


def test_allowed_globals_called_wrongly_are_unreadable(tmp_path):
    # GLOBAL torch.FloatStorage, REDUCE with (): a storage class is not callable here.
    path = tmp_path / "odd.pth"
    path.write_bytes(b"\x80\x02ctorch\nFloatStorage\n)R.")
    with pytest.raises(
        ValueError, match=r"cannot read .*odd.pth: not a readable PyTorch checkpoint"
    ):
        read_state_dict(str(path))
    # A persistent id that is not a storage, in a torch-like zip.
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.persistent_id = lambda obj: ("module", "x") if obj == "ref" else None
    pickler.dump({"w": "ref"})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
    with pytest.raises(ValueError, match="unexpected persistent id"):
        read_state_dict(str(path))


# ---------------------------------------------------------------------- damaged files
def test_corrupt_truncated_and_empty_files(tmp_path):
    torch = _torch()
    tensors = {"w": torch.randn(64, 64)}
    zip_path, legacy_path = tmp_path / "good.pth", tmp_path / "good_legacy.pth"
    torch.save(tensors, zip_path)
    torch.save(tensors, legacy_path, _use_new_zipfile_serialization=False)

    def error(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError) as info:
            read_state_dict(str(path))
        message = str(info.value)
        assert message.startswith(f"cannot read {path}: not a readable PyTorch checkpoint (")
        assert "\n" not in message and "weights_only" not in message
        return message

    assert "empty" in error("empty.pth", b"")
    for seed in range(20):  # seeded: which error the unpickler trips on depends on the bytes
        noise = np.random.RandomState(seed).bytes(1000)
        assert "neither a zip archive nor a pickle" in error("random.pth", noise)
    zipped, legacy = zip_path.read_bytes(), legacy_path.read_bytes()
    for cut in (len(zipped) // 2, len(zipped) - 10):
        assert "may be incomplete" in error("cut.pth", zipped[:cut])
    for cut in (30, len(legacy) // 2, len(legacy) - 1):
        assert "may be incomplete" in error("cut_legacy.pth", legacy[:cut])
    # A stored (uncompressed) byte flipped inside the tensor data: the zip's CRC catches it.
    damaged = bytearray(zipped)
    damaged[zipped.index(tensors["w"].numpy().tobytes()[:16]) + 100] ^= 0xFF
    assert "CRC" in error("flipped.pth", bytes(damaged))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("notes.txt", "hello")
    assert "data.pkl" in error("other.pth", (tmp_path / "other.zip").read_bytes())
    # A storage shorter than the tensor that views it.
    with zipfile.ZipFile(zip_path) as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    with zipfile.ZipFile(tmp_path / "short.zip", "w") as archive:
        for n, data in entries.items():
            archive.writestr(n, data[:400] if n.endswith("data/0") else data)
    assert "needs element 4095 of a storage of 100" in error(
        "short.pth", (tmp_path / "short.zip").read_bytes()
    )


# ---------------------------------------------------------------------- conversion, no torch
def _run_cli_without_torch(*args):
    code = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        f"sys.argv = {[CLI, *args]!r}\n"
        f"runpy.run_path({CLI!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.reference
def test_official_pth_converts_with_torch_unimportable(tmp_path):
    import flax
    from helpers.reference import official_model

    import hiera_jax

    torch = _torch()
    state_dict = official_model("hiera_tiny_224").state_dict()
    path = tmp_path / "hiera_tiny_224.pth"
    torch.save({"model_state": state_dict}, path)
    result = _run_cli_without_torch(
        "--model", "hiera_tiny_224", "--input", str(path), "--output", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr
    assert "official format" in result.stdout
    _, params = hiera_jax.load_pretrained(str(tmp_path / "out"))
    expected = hiera_jax.convert_state_dict(state_dict, "hiera_tiny_224")
    flat, flat_expected = (flax.traverse_util.flatten_dict(p) for p in (params, expected))
    assert flat.keys() == flat_expected.keys()
    for key, value in flat_expected.items():
        np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg="/".join(key))

    # bfloat16 and float16 checkpoints convert to the float32 of their values.
    for dtype in (torch.bfloat16, torch.float16):
        low = {k: v.to(dtype) for k, v in state_dict.items()}
        torch.save(low, path)
        params = hiera_jax.convert_state_dict(read_state_dict(str(path))[0], "hiera_tiny_224")
        expected = hiera_jax.convert_state_dict(
            {k: v.float() for k, v in low.items()}, "hiera_tiny_224"
        )
        flat = flax.traverse_util.flatten_dict(params)
        for key, value in flax.traverse_util.flatten_dict(expected).items():
            actual = flat[key]
            assert actual.dtype == np.float32
            np.testing.assert_array_equal(actual, value, err_msg=f"{dtype} {'/'.join(key)}")
