"""The README is the front door: its set-up commands must be what CI runs, and its snippets and
those of the docs pages that need fixtures (an offline hub, a saved model) run here.

tests/test_docs.py runs the pages' other snippets and checks that every snippet of README.md and
docs/*.md is run (by it or by a test named in the snippet's marker) or marked skipped with a reason.
"""

import os
import re
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    command = re.search(r"```bash\n(pip install -e \"\.\[dev\]\".*pytest.*)\n```", readme)
    assert command, "README.md must show the test set-up command in a bash block"
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert command.group(1) in ci_lines


def test_quick_start_runs():
    readme = _read("README.md")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    # The block that runs offline (the pretrained one-liner downloads; test_hub covers it).
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", quick, re.S) if "init_params" in b)
    namespace = {}
    exec(compile(snippet, "README.md quick start", "exec"), namespace)
    assert namespace["logits"].shape == (2, 1000)


# ---------------------------------------------------------------------- the Hugging Face page
def _hf_section_blocks():
    return re.findall(r"```python\n(.*?)```", _read("docs", "huggingface.md"), re.S)


def _as_transformers(block: str) -> str:
    """The README's JAX code as the transformers docs page writes it."""
    return block.replace("hiera_jax", "transformers").replace(
        'return_tensors="np"', 'return_tensors="pt"'
    )


@pytest.fixture(scope="module")
def docs_repos(tmp_path_factory):
    """Random tiny transformers models saved as the three facebook/hiera-tiny-224 repos are
    (config.json, model.safetensors, BitImageProcessor's preprocessor_config.json)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from helpers.reference import randomise_norms

    root = tmp_path_factory.mktemp("docs_repos")
    tiny = dict(depths=[1, 2, 7, 2], num_heads=[1, 2, 4, 8])
    processor = transformers.BitImageProcessorPil(
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        size={"shortest_edge": 256},
    )
    torch.manual_seed(0)
    models = {
        "facebook/hiera-tiny-224-in1k-hf": transformers.HieraForImageClassification(
            transformers.HieraConfig(**tiny, id2label={i: f"class {i}" for i in range(1000)})
        ),
        "facebook/hiera-tiny-224-hf": transformers.HieraModel(transformers.HieraConfig(**tiny)),
        "facebook/hiera-tiny-224-mae-hf": transformers.HieraForPreTraining(
            transformers.HieraConfig(
                **tiny,
                num_query_pool=2,
                decoder_hidden_size=64,
                decoder_depth=1,
                decoder_num_heads=2,
            )
        ),
    }
    folders = {}
    for repo, model in models.items():
        folder = root / repo.split("/")[1]
        randomise_norms(model.eval()).save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[repo] = folder
    return folders


@pytest.fixture
def offline_hub(docs_repos, tmp_path, monkeypatch):
    """The three repos in an offline hub cache, and cat.jpg in the working directory."""
    import huggingface_hub.constants
    import numpy as np
    from helpers.hub import write_hf_cache
    from PIL import Image

    home = tmp_path / "hf_home"
    for repo, folder in docs_repos.items():
        write_hf_cache(home, repo, folder)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HIERA_JAX_CACHE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # transformers' AutoBackbone asks the hub whether the repo exists even offline; the answer
    # the hub would give (it does) is all this stands in for.
    import transformers.models.auto.auto_factory as auto_factory

    class _Hub:
        def repo_exists(self, repo_id):
            return repo_id in docs_repos

    monkeypatch.setattr(auto_factory, "hf_api", lambda: _Hub())
    monkeypatch.chdir(tmp_path)
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (300, 400, 3), np.uint8)).save("cat.jpg")
    return tmp_path


def test_quick_start_by_name_runs(offline_hub, capsys):
    """README's quick-start blocks that load published weights by name, as written, on the
    offline hub cache of random weights."""
    readme = _read("README.md")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", quick, re.S) if "facebook/" in b]
    assert len(blocks) == 2
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md quick start", "exec"), namespace)
    assert capsys.readouterr().out.startswith("Predicted class: class ")
    assert namespace["params"] is not None and len(namespace["maps"]) == 4


def test_hugging_face_section_runs_as_transformers_does(offline_hub, capsys):
    """Every block of docs/huggingface.md, run literally with hiera_jax and, with the names
    swapped, with transformers, on the same offline hub cache of random weights."""
    import numpy as np
    import torch
    from helpers.reference import rel_err

    blocks = _hf_section_blocks()
    assert len(blocks) == 5
    for block in blocks:
        ours, theirs = {}, {}
        with warnings.catch_warnings():  # a backbone from a HieraModel repo: new norms, as theirs
            warnings.simplefilter("ignore", UserWarning)
            exec(compile(block, "docs/huggingface.md (hiera_jax)", "exec"), ours)
        printed = capsys.readouterr().out
        exec(compile(_as_transformers(block), "docs/huggingface.md (transformers)", "exec"), theirs)
        printed_theirs = capsys.readouterr().out
        if "inputs" not in ours:  # the config block
            assert ours["configuration"].depths == list(theirs["configuration"].depths)
            assert ours["configuration"].num_heads == tuple(theirs["configuration"].num_heads)
            continue
        # The processors: the same pixels to 1/255 (transformers' default backend is
        # torchvision's resize); the models: transformers' numbers on our pixels.
        pixels = np.asarray(ours["inputs"]["pixel_values"])
        assert pixels.shape == tuple(theirs["inputs"]["pixel_values"].shape) == (1, 3, 224, 224)
        std = np.asarray([0.229, 0.224, 0.225])[:, None, None]
        diff = np.abs((pixels - theirs["inputs"]["pixel_values"].numpy()) * std)
        assert diff.mean() < 1 / 255
        x = torch.from_numpy(pixels)
        with torch.no_grad():
            if "feature_maps" in ours:  # transformers' backbone is not Hiera's: shapes only
                assert printed == printed_theirs == "[1, 768, 7, 7]\n"
                continue
            if "loss" in ours:  # the MAE draws a random mask each call, as transformers does
                assert printed == printed_theirs == "[1, 196, 768]\n"
                assert np.isfinite(float(ours["loss"]))
                continue
            reference = theirs["model"](pixel_values=x)
        if "predicted_class_idx" in ours:
            assert rel_err(ours["outputs"].logits, reference.logits.numpy()) < 1e-4
            label = theirs["model"].config.id2label[int(reference.logits.argmax(-1))]
            assert printed == f"Predicted class: {label}\n"
            assert printed_theirs.startswith("Predicted class: class ")
        else:
            assert rel_err(ours["last_hidden_states"], reference.last_hidden_state.numpy()) < 1e-4
            assert printed == printed_theirs == "[1, 49, 768]\n"


def _pages() -> str:
    """README.md and every docs page, one text."""
    docs = sorted(f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
    return "\n".join([_read("README.md")] + [_read("docs", f) for f in docs])


def test_folders_the_readme_writes_into_are_ignored_by_git():
    """What the commands of README and the docs write (`runs/`, the converter's `--output
    ckpt/...`) stays out of `git status`."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    outputs = {p.split("/")[0] for p in re.findall(r"--output (\S+)", _pages())} | {"runs"}
    assert "ckpt" in outputs
    for folder in sorted(outputs):
        path = f"{folder}/anything"
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
        assert ignored, f"{folder}/ (the docs write there) is not in .gitignore"


def test_aot_effort_speed_up_is_the_same_in_help_and_docs():
    docs = _read("docs", "training.md")
    readme = re.findall(r"`--aot_effort`.{0,200}?about (\d+)x faster", docs, re.S)
    helptext = re.findall(r"about (\d+)x faster", _read("train.py"))
    assert readme and helptext and set(readme) == set(helptext), (readme, helptext)


def test_sam2_low_level_snippet_runs(tmp_path, monkeypatch):
    """docs/sam2.md's lower-level SAM 2 steps, as written, on a random transformers Sam2VisionModel
    saved where the snippet reads it (at 256 pixels, to keep it quick)."""
    transformers = pytest.importorskip("transformers")
    from hiera_jax.models import hieradet, hieradet_neck
    from hiera_jax.weights import hieradet_hf_config

    trunk = hieradet.get_config("sam2_hiera_tiny", input_size=(256, 256))
    fields = hieradet_hf_config.transformers_vision_config(trunk, hieradet_neck.FpnNeckConfig())
    model = transformers.Sam2VisionModel(transformers.Sam2VisionConfig(**fields))
    model.save_pretrained(str(tmp_path / "sam2_vision"))
    section = _read("docs", "sam2.md").split("The lower-level steps:", 1)[1]
    snippet = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "docs/sam2.md SAM 2 steps", "exec"), namespace)
    features = namespace["out"]["vision_features"]
    import numpy as np

    assert features.shape == (1, 16, 16, 256) and np.isfinite(np.asarray(features)).all()
