"""Input backends: TFDS ArrayRecord through grain (no TensorFlow), TFDS TFRecord and tfds
ImageFolder through tf.data, the same batch layout on both, and resume through the saved
iterator state."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

from helpers import train as th

th.force_cpu_devices()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from hiera_jax.training.inputs import data as data_lib  # noqa: E402
from hiera_jax.training.inputs import pipeline, sources, tfdata  # noqa: E402
from hiera_jax.training.loop import train_and_evaluate  # noqa: E402

tfds = pytest.importorskip("tensorflow_datasets")

N_TRAIN, N_VAL = 24, 10


def _pixel(i: int) -> int:
    return 10 * i


def _prepare(data_dir, file_format: str) -> str:
    """A 3-class RGB TFDS dataset (pixel value 10*i, label i % 3) in `file_format`."""

    # Unregistered: training finds it from its files alone, as for a user without builder code.
    class TinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples(N_TRAIN),
                "validation": self._generate_examples(N_VAL),
            }

        def _generate_examples(self, n):
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(np.full((20, 24, 3), _pixel(i), np.uint8)).save(buf, "PNG")
                yield i, {"image": buf.getvalue(), "label": i % 3}

    TinyShapes(data_dir=str(data_dir), file_format=file_format).download_and_prepare()
    return "tiny_shapes"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The same dataset prepared twice: ArrayRecord (grain) and TFRecord (tf.data)."""
    root = tmp_path_factory.mktemp("tfds")
    _prepare(root / "array_record", "array_record")
    _prepare(root / "tfrecord", "tfrecord")
    return root


def _data_config(data_dir, **values):
    cfg = th.make_config("classification").data
    cfg.source, cfg.name, cfg.data_dir = "tfds", "tiny_shapes", str(data_dir)
    cfg.mean, cfg.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    for key, value in values.items():
        cfg[key] = value
    return cfg


def _loader(source, cfg, *, train=True, index=0, count=1, seed=0):
    transform = data_lib.Transform(cfg, (16, 16), 3, train=train)
    kwargs = dict(
        global_batch=4,
        seed=seed,
        num_classes=3,
        data_config=cfg,
        with_labels=True,
        process_index=index,
        process_count=count,
    )
    if isinstance(source, tfdata.TfDataSource):
        return tfdata.TfDataTrainIterator(source, transform, **kwargs)
    return iter(pipeline.train_dataset(source, transform, **kwargs))


def test_array_record_is_read_through_grain_without_tensorflow(prepared):
    data_dir = prepared / "array_record"
    source = sources.make_source(_data_config(data_dir), "train", (16, 16))
    assert isinstance(source, data_lib.TfdsSource)
    assert len(source) == N_TRAIN and source.num_classes == 3 and source.channels == 3
    pixels = set()
    for index in range(len(source)):  # TFDS shuffles records on write: check pairs, not order
        image, label = source.load(index, None)
        assert image.shape == (20, 24, 3) and image.dtype == np.uint8
        assert label == (int(image[0, 0, 0]) // 10) % 3
        pixels.add(int(image[0, 0, 0]))
    assert pixels == {_pixel(i) for i in range(N_TRAIN)}
    # A fresh interpreter reads batches from it and never imports TensorFlow.
    script = (
        "import sys, numpy as np\n"
        "sys.path.insert(0, 'tests')\n"
        "from helpers import train as th\n"
        "from hiera_jax.training.inputs import data, pipeline, sources\n"
        "cfg = th.make_config('classification').data\n"
        f"cfg.source, cfg.name, cfg.data_dir = 'tfds', 'tiny_shapes', {str(data_dir)!r}\n"
        "cfg.mean = cfg.std = (0.5, 0.5, 0.5)\n"
        "src = sources.make_source(cfg, 'train', (16, 16))\n"
        "it = iter(pipeline.train_dataset(src, data.Transform(cfg, (16, 16), 3, train=True),\n"
        "    global_batch=4, seed=0, num_classes=3, data_config=cfg, with_labels=True))\n"
        "b = next(it)\n"
        "assert b['image'].shape == (4, 16, 16, 3) and b['label'].shape == (4, 3)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": th.REPO}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=th.REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_tfrecord_goes_through_tf_data_with_the_grain_layout(prepared):
    grain_src = sources.make_source(_data_config(prepared / "array_record"), "validation", (16,))
    cfg = _data_config(prepared / "tfrecord")
    with pytest.raises(FileNotFoundError, match="backend='tf'"):  # grain cannot read TFRecord
        sources.make_source(_data_config(prepared / "tfrecord", backend="grain"), "train", (16,))
    source = sources.make_source(cfg, "validation", (16, 16))  # auto picks tf.data
    assert isinstance(source, tfdata.TfDataSource)
    assert len(source) == N_VAL and source.num_classes == 3 and source.channels == 3
    # Evaluation: the same examples in the same rows as grain reading the ArrayRecord copy
    # (TFDS writes both formats in the same order), on 1 and on 2 processes.
    for count in (1, 2):
        for index in range(count):
            kwargs = dict(
                global_batch=4,
                max_examples=7,
                with_labels=True,
                process_index=index,
                process_count=count,
            )
            transform = data_lib.Transform(cfg, (16, 16), 3, train=False)
            ours = list(tfdata.eval_batches(source, transform, **kwargs))
            reference = list(pipeline.eval_batches(grain_src, transform, **kwargs))
            assert len(ours) == len(reference) == 2
            for a, b in zip(ours, reference):
                for key in ("image", "label", "valid"):
                    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert [int(im[0, 0, 0]) for im in source.first(3)] == [
        int(grain_src.load(i, None)[0][0, 0, 0]) for i in range(3)
    ]


def test_tf_data_training_stream_is_deterministic_and_resumable(prepared):
    cfg = _data_config(prepared / "tfrecord", mixup=0.8, cutmix=1.0, shuffle_buffer=8)
    source = sources.make_source(cfg, "train", (16, 16))

    def take(it, n):
        return [next(it) for _ in range(n)]

    a = _loader(source, cfg)
    first = take(a, 8)
    second = take(_loader(source, cfg), 8)
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert [int(b["position"][0]) for b in first] == [4 * s for s in range(8)]
    # Its state (what grain's orbax handler saves) resumes at the next batch.
    it = _loader(source, cfg)
    take(it, 3)
    state = it.get_state()
    resumed = _loader(source, cfg)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], first[3]["image"])
    with pytest.raises(ValueError, match="not a tf.data input state"):
        resumed.set_state(b'{"next_index": 4}')
    for x in (a, it, resumed):
        x.close()
    # Each epoch (6 batches of 4) visits every example once; labels are the pixel's class.
    cfg.mixup = cfg.cutmix = 0.0
    plain = _loader(source, cfg, train=False)
    batches = take(plain, 12)
    plain.close()
    for epoch in (batches[:6], batches[6:]):
        labels = np.concatenate([b["label"].argmax(-1) for b in epoch])
        assert sorted(np.bincount(labels)) == [8, 8, 8]
    assert not np.array_equal(batches[0]["image"], batches[6]["image"])  # reshuffled
    # Two processes read disjoint halves of the split (TFDS even_splits).
    halves = []
    for index in range(2):
        it = _loader(source, cfg, train=False, index=index, count=2)
        halves.append(np.concatenate([next(it)["image"] for _ in range(6)]))
        it.close()
    assert {float(v) for v in halves[0][:, 0, 0, 0]}.isdisjoint(halves[1][:, 0, 0, 0])


def test_image_folder_through_tf_data(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(n):
                value = 40 * i + (0 if cls == "cat" else 1)
                Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    cfg = th.make_config("classification").data
    cfg.source, cfg.data_dir, cfg.backend = "folder", str(tmp_path), "tf"
    cfg.mean, cfg.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    train = sources.make_source(cfg, "train", (16, 16))
    val = sources.make_source(cfg, "val", (16, 16))
    assert isinstance(train, tfdata.TfDataSource) and train.classes == ["cat", "dog"]
    assert len(train) == 8 and len(val) == 4 and train.num_classes == 2
    # Labels follow the folders: odd pixel values are dogs.
    pairs = {
        (int(im[0, 0, 0]), int(label))
        for ex in train.records(seed=0, train=False).as_numpy_iterator()
        for im, label in [(np.asarray(train.decode(ex["image"])), ex["label"])]
    }
    assert pairs == {(40 * i + c, c) for i in range(4) for c in (0, 1)}
    with pytest.raises(FileNotFoundError, match="<split>/<class>"):
        sources.make_source(cfg, "test", (16, 16))


def test_missing_tensorflow_says_how_to_install_it(prepared, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
    with pytest.raises(ImportError, match=r"pip install -e '\.\[tf\]'"):
        sources.make_source(_data_config(prepared / "tfrecord"), "train", (16, 16))


@pytest.mark.parametrize(
    "backend, drop_input_state",
    [("tf", False), ("grain", True)],  # grain's saved state: test_train_resume's killed runs
)
def test_training_resumes_with_and_without_the_saved_input_state(
    backend, drop_input_state, prepared, tmp_path, capsys
):
    """4 steps straight vs. a restart from the step-2 checkpoint (step 4 removed), through the
    saved iterator state or (state removed) by rebuilding the input at step 2."""
    values = th.overrides(
        total_steps=4,
        checkpoint_every=2,
        keep_checkpoints=3,
        batch_size=8,
        eval_batch_size=8,
        eval_every=0,
        mesh_shape=(2, 4),
        model__num_classes=3,
        model__in_chans=3,
        model__input_size=(16, 16),
        data__source="tfds",
        data__name="tiny_shapes",
        data__data_dir=str(prepared / ("tfrecord" if backend == "tf" else "array_record")),
        data__mean=(0.5, 0.5, 0.5),
        data__std=(0.5, 0.5, 0.5),
        data__randaug="rand-m9-mstd0.5-inc1",
        data__mixup=0.8,
        data__cutmix=1.0,
        data__shuffle_buffer=8,
        data__eval_split="validation",
    )
    config = th.make_config("classification", values)
    straight = train_and_evaluate(config, str(tmp_path), return_params=True, progress=False)
    assert 0.0 <= straight["eval"]["top1"] <= 1.0 and straight["eval"]["loss"] > 0
    ckpt = tmp_path / "checkpoints"
    assert os.path.isfile(ckpt / "2" / "data" / "process_0-of-1.json")
    capsys.readouterr()
    shutil.rmtree(ckpt / "4")
    if drop_input_state:
        shutil.rmtree(ckpt / "2" / "data")
    resumed = train_and_evaluate(config, str(tmp_path), return_params=True, progress=False)
    assert resumed["resumed_from"] == 2
    np.testing.assert_array_equal(
        [h["loss"] for h in resumed["history"]], [h["loss"] for h in straight["history"][2:]]
    )
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(a, b)
    assert ("input from the step" in capsys.readouterr().out) == drop_input_state


def test_worker_processes_give_the_same_batches_as_threads():
    config = th.make_config("classification", th.overrides(data__mixup=0.8, data__cutmix=1.0))
    config.data.randaug = "rand-m9-mstd0.5-inc1"
    source = data_lib.DigitsSource("train")
    transform = data_lib.Transform(config.data, (32, 32), 1, train=True)

    def batches(processes):
        config.data.worker_processes = processes
        it = iter(
            pipeline.train_dataset(
                source,
                transform,
                global_batch=16,
                seed=1,
                num_classes=10,
                data_config=config.data,
                with_labels=True,
            )
        )
        out = [next(it) for _ in range(4)]
        state = it.get_state()
        it.close()
        return out, state

    threads, _ = batches(0)
    processes, state = batches(2)
    assert state["iterators_in_use_states"]  # grain's multiprocess state, saved per checkpoint
    for a, b in zip(threads, processes):
        for key in ("image", "label", "position"):
            np.testing.assert_array_equal(a[key], b[key])


def test_repeated_augmentation_repeats_each_example_with_new_draws():
    config = th.make_config("mae", th.overrides(data__repeated_aug=3))
    source = data_lib.MovingDigitsSource("train", 4, (16, 16))  # its clips come from the rng
    transform = data_lib.Transform(config.data, (4, 16, 16), 1, train=True)
    it = iter(
        pipeline.train_dataset(
            source,
            transform,
            global_batch=6,
            seed=0,
            num_classes=10,
            data_config=config.data,
            with_labels=False,
        )
    )
    images = np.concatenate([next(it)["image"] for _ in range(2)])
    for group in images.reshape(4, 3, *images.shape[1:]):
        assert len({g.tobytes() for g in group}) == 3  # three different draws per group ...
    # ... of one source example: with labels, each group of three shares its label.
    reference = iter(
        pipeline.train_dataset(
            data_lib.DigitsSource("train"),
            data_lib.Transform(config.data, (32, 32), 1, train=True),
            global_batch=6,
            seed=0,
            num_classes=10,
            data_config=config.data,
            with_labels=True,
        )
    )
    labels = next(reference)["label"].argmax(-1)
    assert labels[0] == labels[1] == labels[2] and labels[3] == labels[4] == labels[5]
