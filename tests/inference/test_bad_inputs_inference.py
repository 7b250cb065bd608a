"""Bad inputs to Predictor, the models and the predict CLI: each fails loudly with one clear line.

"No silent wrong answers": 0-255 floats, integer model input, channels-first arrays,
NaN, empty batches, a bad --top-k, missing files and training workdirs given as model
directories each raise (or exit 2) with a message that says what to do. One row per case.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import hiera_jax
from hiera_jax import (
    HieraForImageClassification,
    HieraForPreTraining,
    HieraModel,
    inference,
    predict,
)

# A 64x64, one-block-per-stage classifier: every check runs before (or while) tracing, so each
# row takes milliseconds; the few rows that run the model compile it once per module.
SMALL = dict(
    input_size=(64, 64), embed_dim=16, stages=(1, 1, 1, 1), num_classes=10, head_init_scale=1.0
)
VIDEO = dict(input_size=(4, 64, 64), embed_dim=8, stages=(1, 1, 1, 1), num_classes=10)
CROP_FREE = 73  # int(256 / 224 * 64): an image with this short side is only cropped, not resized


def _pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 RGB image (so resampling overshoot stays small)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="module")
def predictor():
    return inference.Predictor.random("hiera_tiny_224", **SMALL)


@pytest.fixture(scope="module")
def video_predictor():
    return inference.Predictor.random("hiera_base_16x224", **VIDEO)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved small classifier, an image, a broken image, and two training workdirs."""
    root = tmp_path_factory.mktemp("bad_inputs")
    config = hiera_jax.get_config("hiera_tiny_224", **SMALL)
    params = hiera_jax.init_params(HieraForImageClassification(config), jax.random.key(0))
    ckpt = hiera_jax.save_pretrained(
        str(root / "ckpt"), params, config, model_type="classification"
    )
    # A finished train.py workdir: the model is exported to WORKDIR/model.
    hiera_jax.save_pretrained(
        str(root / "run_done" / "model"), params, config, model_type="classification"
    )
    os.makedirs(root / "run_done" / "checkpoints")
    os.makedirs(root / "run_unfinished" / "checkpoints" / "100")  # stopped before exporting
    image = root / "photo.png"
    Image.fromarray(_pixels(80, 96)).save(image)
    broken = root / "broken.png"
    broken.write_text("not an image")
    return {
        "root": str(root),
        "ckpt": ckpt,
        "image": str(image),
        "broken": str(broken),
        "missing": str(root / "nowhere.jpg"),
        "run_done": str(root / "run_done"),
        "run_unfinished": str(root / "run_unfinished"),
    }


# ---------------------------------------------------------------------- Predictor (images)
U8 = _pixels(80, 96)
F01 = U8.astype(np.float32) / 255.0

PREDICTOR_CASES = {
    # Value range: 0-255 data stored as float would be read as a washed-out [0, 1] image.
    "float_0_255": (lambda p: p.predict([U8.astype(np.float32)]), ValueError,
                    "float images must be in [0, 1] (got range [6, 250]); pass uint8"),
    "float_normalised": (lambda p: p.predict([(F01 - 0.45) / 0.225]), ValueError,
                         "float images must be in [0, 1]"),
    "preprocess_image_0_255": (
        lambda p: inference.preprocess_image(U8.astype(np.float32), 64, source="cat"),
        ValueError, "cat: float images must be in [0, 1]"),
    "float64_0_255": (lambda p: p.top_k([U8.astype(np.float64)]), ValueError, "divide by 255"),
    "nan": (lambda p: p.predict([np.where(F01 > 0.5, np.nan, F01)]), ValueError, "NaN or inf"),
    "inf": (lambda p: p.predict([np.where(F01 > 0.5, np.inf, F01)]), ValueError, "NaN or inf"),
    "int64": (lambda p: p.predict([U8.astype(np.int64)]), ValueError,
              "must be uint8 (0-255) or float in [0, 1], got int64"),
    "bool": (lambda p: p.predict([U8 > 127]), ValueError, "got bool"),
    # Layout and channels.
    "channels_first": (lambda p: p.predict([U8.transpose(2, 0, 1)]), ValueError,
                       "looks channels-first [C, H, W]"),
    "two_channels": (lambda p: p.predict([U8[..., :2]]), ValueError, "C in (1, 3, 4)"),
    "five_channels": (lambda p: p.predict([np.concatenate([U8, U8[..., :2]], -1)]), ValueError,
                      "C in (1, 3, 4)"),
    "rank_4_item": (lambda p: p.predict([U8[None, None]]), ValueError, "expected an image array"),
    "empty_image": (lambda p: p.predict([np.zeros((0, 0, 3), np.uint8)]), ValueError,
                    "empty image array"),
    # One image where a sequence is expected (iterating it would give H wrong "images").
    "one_image_array": (lambda p: p.predict(U8), ValueError, "for one image pass [image]"),
    "one_gray_array": (lambda p: p.predict(U8[..., 0]), ValueError, "one image?"),
    "one_path": (lambda p: p.predict("photo.png"), ValueError, "expected a sequence of inputs"),
    "one_pil": (lambda p: p.predict(Image.fromarray(U8)), ValueError, "pass [image]"),
    # Empty batches.
    "empty_list": (lambda p: p.predict([]), ValueError, "no inputs given"),
    "empty_array": (lambda p: p.predict(np.zeros((0, 80, 96, 3), np.uint8)), ValueError,
                    "no inputs given"),
    "empty_features": (lambda p: p.features([]), ValueError, "no inputs given"),
    # top_k.
    "top_k_0": (lambda p: p.top_k([U8], k=0), ValueError, "must be a positive integer, got 0"),
    "top_k_negative": (lambda p: p.top_k([U8], k=-3), ValueError, "got -3"),
    "top_k_float": (lambda p: p.top_k([U8], k=2.5), ValueError, "got 2.5"),
    # preprocessed=True takes the model's normalised float input and nothing else.
    "pre_uint8": (lambda p: p.predict(U8[None], preprocessed=True), ValueError,
                  "preprocessed=True takes the model's normalised float input, got dtype uint8"),
    "pre_0_255": (lambda p: p.predict(np.full((1, 64, 64, 3), 200.0, np.float32),
                                      preprocessed=True), ValueError,
                  "outside what normalised images give"),
    "pre_nan": (lambda p: p.features(np.full((1, 64, 64, 3), np.nan, np.float32),
                                     preprocessed=True), ValueError, "NaN or inf"),
    "pre_empty": (lambda p: p.predict(np.zeros((0, 64, 64, 3), np.float32), preprocessed=True),
                  ValueError, "no inputs given"),
    "pre_channels_first": (lambda p: p.predict(np.zeros((2, 3, 64, 64), np.float32),
                                               preprocessed=True), ValueError,
                           "x.transpose(0, 2, 3, 1)"),
    "pre_wrong_size": (lambda p: p.predict(np.zeros((2, 32, 32, 3), np.float32),
                                           preprocessed=True), ValueError,
                       "expected input size (64, 64)"),
    "pre_one_channel": (lambda p: p.predict(np.zeros((2, 64, 64, 1), np.float32),
                                            preprocessed=True), ValueError,
                        "expected 3 channels"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PREDICTOR_CASES))
def test_predictor_bad_input(predictor, case):
    call, error, message = PREDICTOR_CASES[case]
    with pytest.raises(error) as info:
        call(predictor)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


FILE_CASES = {
    "missing_file": (lambda p, f: p.predict([f["missing"]]), FileNotFoundError,
                     "image file not found: {missing}"),
    "broken_file": (lambda p, f: p.predict([f["image"], f["broken"]]), OSError,
                    "cannot read image {broken}"),
    "unfinished_workdir": (lambda p, f: inference.Predictor.from_pretrained(f["run_unfinished"]),
                           FileNotFoundError, "the run has not finished"),
    "load_pretrained_unfinished": (lambda p, f: hiera_jax.load_pretrained(f["run_unfinished"]),
                                   FileNotFoundError, "--workdir {run_unfinished}` to resume"),
    "not_a_model_dir": (lambda p, f: inference.Predictor.from_pretrained(f["root"]),
                        FileNotFoundError, "is not a hiera-jax model directory"),
    "no_such_dir": (lambda p, f: inference.Predictor.from_pretrained(f["missing"]),
                    FileNotFoundError, "{missing} does not exist"),
    "zero_input_size": (lambda p, f: inference.Predictor.random("hiera_tiny_224",
                                                                input_size=(0, 0)),
                        ValueError, "input_size must hold positive integers"),
    "zero_channels": (lambda p, f: hiera_jax.get_config("hiera_tiny_224", in_chans=0),
                      ValueError, "in_chans must be a positive integer"),
}  # fmt: skip


def test_a_finished_workdir_loads_the_model_it_wrote(files):
    """As `init_from` does: a finished train.py workdir stands for its `model/`."""
    from_dir = inference.Predictor.from_pretrained(files["ckpt"])
    from_run = inference.Predictor.from_pretrained(files["run_done"])
    assert from_run.source == os.path.join(files["run_done"], "model")
    probs = from_run.predict([files["image"]])
    np.testing.assert_array_equal(probs, from_dir.predict([files["image"]]))
    _, params = hiera_jax.load_pretrained(files["run_done"])
    _, expected = hiera_jax.load_pretrained(files["ckpt"])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The command line too.
    from hiera_jax import predict

    assert predict.main(["--checkpoint", files["run_done"], files["image"]]) == 0


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_predictor_bad_files_and_directories(predictor, files, case):
    call, error, message = FILE_CASES[case]
    with pytest.raises(error) as info:
        call(predictor, files)
    assert message.format(**files) in str(info.value)


# ---------------------------------------------------------------------- Predictor (video)
CLIP = np.stack([_pixels(70, 70, seed=t) for t in range(13)])  # 4 frames at stride 4 need 13

VIDEO_CASES = {
    "one_clip_array": (lambda p: p.predict(CLIP), "for one clip pass [clip]"),
    "image_as_clip": (lambda p: p.predict([Image.fromarray(CLIP[0])]),
                      "a clip is a sequence of frames or an array [T, H, W, C]"),
    "rank_3_clip": (lambda p: p.predict([CLIP[0]]), "a clip array must be [T, H, W, C]"),
    "float_0_255_frames": (lambda p: p.predict([CLIP.astype(np.float32)]),
                           "input 0 frame 0: float images must be in [0, 1]"),
    "nan_frames": (lambda p: p.predict([np.full(CLIP.shape, np.nan, np.float32)]), "NaN or inf"),
    "channels_first_frames": (lambda p: p.predict([CLIP.transpose(0, 3, 1, 2)]),
                              "looks channels-first"),
    "too_short": (lambda p: p.predict([CLIP[:12]]), "has 12 frames"),
    "empty": (lambda p: p.predict([]), "no inputs given"),
    "pre_channels_first": (lambda p: p.predict(np.zeros((1, 3, 4, 64, 64), np.float32),
                                               preprocessed=True), "x.transpose(0, 2, 3, 4, 1)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(VIDEO_CASES))
def test_video_predictor_bad_input(video_predictor, case):
    call, message = VIDEO_CASES[case]
    with pytest.raises(ValueError) as info:
        call(video_predictor)
    assert message in str(info.value)


# ---------------------------------------------------------------------- model.apply
_IMG = hiera_jax.get_config("hiera_tiny_224", **SMALL)
_MAE = hiera_jax.get_config("mae_hiera_tiny_224", **{**SMALL, "num_classes": 1000})
_VID = hiera_jax.get_config("hiera_base_16x224", **VIDEO)

MODEL_CASES = {
    "classifier_uint8": (HieraForImageClassification(_IMG), (2, 64, 64, 3), jnp.uint8,
                         "the model takes normalised float input, got dtype uint8"),
    "backbone_int32": (HieraModel(_IMG), (2, 64, 64, 3), jnp.int32, "(x / 255 - mean) / std"),
    "mae_uint8": (HieraForPreTraining(_MAE), (2, 64, 64, 3), jnp.uint8,
                  "normalised float input, got dtype uint8"),
    "bool": (HieraForImageClassification(_IMG), (2, 64, 64, 3), jnp.bool_, "got dtype bool"),
    "video_uint8": (HieraForImageClassification(_VID), (1, 4, 64, 64, 3), jnp.uint8,
                    "normalised float input"),
    "nchw": (HieraForImageClassification(_IMG), (2, 3, 64, 64), jnp.float32,
             "looks channels-first [B, C, H, W], but the models take channels-last [B, H, W, C]: "
             "transpose it with x.transpose(0, 2, 3, 1)"),
    "nchw_backbone": (HieraModel(_IMG), (2, 3, 64, 64), jnp.float32, "x.transpose(0, 2, 3, 1)"),
    "nchw_mae": (HieraForPreTraining(_MAE), (2, 3, 64, 64), jnp.float32,
                 "x.transpose(0, 2, 3, 1)"),
    "nchw_other_size": (HieraForImageClassification(_IMG), (2, 3, 96, 96), jnp.float32,
                        "x.transpose(0, 2, 3, 1); the model also expects size (64, 64), and this "
                        "input is (96, 96)"),
    "ncthw": (HieraForImageClassification(_VID), (1, 3, 4, 64, 64), jnp.float32,
              "looks channels-first [B, C, T, H, W], but the models take channels-last "
              "[B, T, H, W, C]"),
    "ncthw_transpose": (HieraModel(_VID), (1, 3, 4, 64, 64), jnp.float32,
                        "transpose it with x.transpose(0, 2, 3, 4, 1)"),
    "wrong_size": (HieraForImageClassification(_IMG), (2, 32, 32, 3), jnp.float32,
                   "build the model with input_size=(32, 32)"),
    "wrong_channels": (HieraForImageClassification(_IMG), (2, 64, 64, 1), jnp.float32,
                       "expected 3 channels"),
    "wrong_rank": (HieraForImageClassification(_IMG), (64, 64, 3), jnp.float32,
                   "expected input of rank 4"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_apply_bad_input(case):
    model, shape, dtype, message = MODEL_CASES[case]
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
    with pytest.raises(ValueError) as info:  # raised while tracing: no compute, no compile
        jax.eval_shape(lambda: model.init(rngs, jnp.zeros(shape, dtype)))
    assert message in str(info.value)


def test_model_checks_are_static_and_do_not_change_float_input():
    """bfloat16 input still passes; a valid float batch gives the same logits jitted or not."""
    model = HieraForImageClassification(_IMG)
    params = hiera_jax.init_params(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    eager = model.apply({"params": params}, x)
    jitted = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-6)
    out = jax.eval_shape(lambda: model.apply({"params": params}, x.astype(jnp.bfloat16)))
    assert out.shape == (2, 10)


# ---------------------------------------------------------------------- same image, two dtypes
@pytest.mark.parametrize("size", [(CROP_FREE, 90), (120, 100)])
def test_uint8_and_float_versions_give_the_same_prediction(predictor, size):
    pixels = _pixels(*size, seed=5)
    as_float = pixels.astype(np.float32) / 255.0
    probs_u8, probs_f = predictor.predict([pixels, as_float])
    assert np.argmax(probs_u8) == np.argmax(probs_f)
    if size[0] == CROP_FREE:  # cropped only: the very same normalised pixels
        np.testing.assert_allclose(probs_f, probs_u8, rtol=1e-5, atol=1e-7)
    else:  # resampled in 8 bits vs float: a few grey levels apart
        np.testing.assert_allclose(probs_f, probs_u8, atol=2e-3)
    top_u8, top_f = predictor.top_k([pixels, as_float], k=3)
    assert [name for name, _ in top_u8] == [name for name, _ in top_f]
    # Not vacuous: the model does tell this picture from a blank one (what 0-255 data read as
    # [0, 1] and clipped would look like) by far more than the tolerance above.
    (blank,) = predictor.predict([np.ones_like(as_float)])
    assert np.abs(blank - probs_u8).max() > 2e-2  # 10x the tolerance of the resized case
    # A PIL image and a float64 array go through the same two paths.
    np.testing.assert_allclose(
        predictor.predict([Image.fromarray(pixels), as_float.astype(np.float64)]),
        [probs_u8, probs_f],
        rtol=1e-5,
        atol=1e-7,
    )


def test_top_k_above_num_classes_gives_every_class(predictor):
    (row,) = predictor.top_k([U8], k=25)
    assert len(row) == 10 and sorted(name for name, _ in row) == sorted(predictor.names)


def test_sixteen_bit_png_is_scaled_not_clipped(predictor, tmp_path):
    """PIL's own convert("RGB") clips 16-bit images to white; they are scaled to 8 bits."""
    gray = _pixels(CROP_FREE, 90, seed=7)[..., 0]
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(gray).save(tmp_path / "plain.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    deep, plain = predictor.preprocess([str(tmp_path / "deep.png"), str(tmp_path / "plain.png")])
    np.testing.assert_array_equal(deep, plain)


# ---------------------------------------------------------------------- predict CLI
def _cli(argv, capsys):
    """(exit code, stdout, stderr) of predict.main in this process."""
    try:
        code = predict.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CLI_CASES = {
    "top_k_0": (["--checkpoint", "{ckpt}", "--top-k", "0", "{image}"],
                "argument --top-k: must be a positive integer (>= 1), got 0"),
    "top_k_negative": (["--checkpoint", "{ckpt}", "--top-k", "-2", "{image}"],
                       "must be a positive integer (>= 1), got -2"),
    "top_k_text": (["--checkpoint", "{ckpt}", "--top-k", "five", "{image}"],
                   "expected a positive integer, got 'five'"),
    "input_size_0": (["--checkpoint", "{ckpt}", "--input-size", "0", "{image}"],
                     "argument --input-size: must be a positive integer"),
    "input_size_negative": (["--model", "hiera_tiny_224", "--input-size", "-64", "{image}"],
                            "argument --input-size: must be a positive integer"),
    "input_size_unfit": (["--model", "hiera_tiny_224", "--input-size", "100", "{image}"],
                         "cannot build hiera_tiny_224 at --input-size 100: the token grid"),
    "batch_size_0": (["--checkpoint", "{ckpt}", "--batch-size", "0", "{image}"],
                     "argument --batch-size: must be a positive integer"),
    "unknown_model": (["--model", "hiera_nope", "{image}"], "unknown model name 'hiera_nope'"),
    "near_model_name": (["--model", "hiera_tiny", "{image}"], "did you mean hiera_tiny_224?"),
    "no_model": (["{image}"], "give --checkpoint DIR, or --model NAME"),
    "missing_image": (["--checkpoint", "{ckpt}", "{image}", "{missing}"],
                      "input file not found: {missing}"),
    "missing_image_random_model": (["--model", "hiera_tiny_224", "{missing}"],
                                   "input file not found: {missing}"),
    "broken_image": (["--checkpoint", "{ckpt}", "{image}", "{broken}"],
                     "cannot read image {broken}"),
    "no_such_checkpoint": (["--checkpoint", "{missing}", "{image}"], "{missing} does not exist"),
    "unfinished_workdir": (["--checkpoint", "{run_unfinished}", "{image}"],
                           "the run has not finished"),
    "bad_dtype": (["--checkpoint", "{ckpt}", "--dtype", "f16", "{image}"],
                  "argument --dtype: invalid choice: 'f16'"),
    "no_inputs": (["--checkpoint", "{ckpt}"],
                  "give the input files (or --export FILE to write the model)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input(files, capsys, case):
    argv, message = CLI_CASES[case]
    code, out, err = _cli([a.format(**files) for a in argv], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err  # exactly one line
    assert message.format(**files) in err
    assert "Traceback" not in err and out == ""


def test_cli_verbose_adds_the_traceback(files, capsys):
    code, _, err = _cli(["--verbose", "--checkpoint", files["ckpt"], files["broken"]], capsys)
    assert code == 2
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: cannot read image")


def test_cli_top_k_above_num_classes_shows_all_with_a_note(files, capsys):
    code, out, err = _cli(["--checkpoint", files["ckpt"], "--top-k", "12", files["image"]], capsys)
    assert code == 0
    assert "note: --top-k 12 is more than the model's 10 classes; showing all 10" in err
    assert "10. " in out and "11. " not in out


def test_cli_exit_code_and_stderr_in_a_real_process(files):
    """`python -m hiera_jax.predict` itself: exit status 2, one line, no traceback."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for argv, message in [
        (["--checkpoint", files["ckpt"], files["missing"]], "input file not found"),
        (["--checkpoint", files["ckpt"], "--top-k", "0", files["image"]], "--top-k"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "hiera_jax.predict", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
