"""Pretrained weights by name: Hugging Face repos, timm hub names, the official release URLs.

`resolve_pretrained(name)` returns a local model directory (`hiera_jax.weights.directory`) for
any of

- one of our names (`hiera_tiny_224`, `mae_hiera_tiny_224`, `hiera_base_16x224`, ... see
  `PRETRAINED` / `list_pretrained()`), fetched from the first source the table lists for it
  (`source=` picks one: "hf", "timm" or "official");
- a Hugging Face repo id: `facebook/hiera-tiny-224-in1k-hf` (transformers format), `timm/...`,
  the official code's hub repos (`facebook/hiera_base_224.mae_in1k_ft_in1k`), or any repo as
  `hf-hub:owner/name`. Downloaded with `huggingface_hub.snapshot_download`, so `HF_HOME`,
  `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `revision=` and `token=` work as everywhere on the hub;
- a timm name with its pretrained tag (`hiera_base_224.mae_in1k_ft_in1k`, `hiera_base_224.mae`),
  which timm keeps on the hub as `timm/<name>.<tag>`;
- an official name with its checkpoint tag (`hiera_base_224.mae_in1k_ft_in1k`,
  `mae_hiera_base_224.mae_in1k`, `hiera_base_16x224.mae_k400_ft_k400`) or a `.pth` URL:
  downloaded with urllib into a checksum-verified cache (a sha256 prefix in the file name, as
  torch.hub names them, is checked; otherwise the sha256 is recorded on first download and every
  later use of the file is checked against it);
- a local path: a model directory (ours or transformers'), a PyTorch checkpoint file (`.pth`,
  `.safetensors`, ...) or a folder of weights without a Hiera config (timm's).

A transformers repo or directory is read as it is: its config.json decides the architecture.
Checkpoints without one (official `.pth`, timm) are converted once, with
`hiera_jax.weights.convert`, into

    $HIERA_JAX_CACHE (default $HF_HOME/hiera_jax, i.e. ~/.cache/huggingface/hiera_jax)
      hf/<owner>--<repo>/<commit>/<variant>-<model_type>/     from a timm repo on the hub
      official/<file stem>/<sha256[:16]>/<variant>-<model_type>/  from a .pth URL
      local/<digest of path, size, mtime>/<variant>-<model_type>/  from a local PyTorch file
      downloads/<file>, downloads/<file>.sha256                 the downloaded .pth files

and later calls load that directory without converting again (a new hub commit or a different
file converts anew). For those the variant (`hiera_tiny_224`...), model type and class count
are read from the tensor shapes, and checked against the table for the names it lists.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from hiera_jax.models.variants import TIMM_VARIANTS, VARIANTS, get_config
from hiera_jax.weights import convert as convert_lib
from hiera_jax.weights import directory as directory_lib
from hiera_jax.weights import formats
from hiera_jax.weights.directory import CONFIG_FILE, save_pretrained

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/hiera/{file}.pth"
SOURCE_KINDS = ("hf", "timm", "official")
HUB_ORGS = ("facebook", "timm")  # repo ids of these owners need no `hf-hub:` prefix
# A repo's weights, in the order they are looked for: transformers' keys, our official-key file
# (models transformers has no form for), transformers' older pickle.
WEIGHT_FILES = ("model.safetensors", "model_official.safetensors", "pytorch_model.bin")
SOURCE_FILE = "source.json"  # written next to config.json in every converted directory
_HTTP_MODULES = ("huggingface_hub", "httpx", "httpx2", "httpcore")  # their errors: a failed fetch
_HASH_PREFIX = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's convention: name-<sha256 prefix>.pth


class PretrainedNotFoundError(FileNotFoundError):
    """A pretrained checkpoint is neither cached nor downloadable (offline, no network, no repo)."""


class ChecksumError(ValueError):
    """A cached download does not match its recorded (or file-name) sha256."""


# ---------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Where the weights for one of our names live, in each format they were published in."""

    model: str  # our variant (hiera_jax.list_models())
    model_type: str  # "classification", "pretraining" or "backbone" (HieraModel)
    tag: str  # the official checkpoint name (`checkpoint=` of the official constructors)
    hf: str | None = None  # Hugging Face transformers repo id
    timm: str | None = None  # timm hub repo id (timm/<timm name>.<tag>)
    url: str | None = None  # the official release .pth
    url_key: str = "model_state"  # the state dict's key inside the official .pth
    aliases: tuple[str, ...] = ()  # other names that mean this entry
    order: tuple[str, ...] = SOURCE_KINDS  # which source an unqualified name uses first

    @property
    def sources(self) -> dict[str, str]:
        """{source kind: repo id or URL} for the sources this entry has, in `order`."""
        found = {"hf": self.hf, "timm": self.timm, "official": self.url}
        return {kind: found[kind] for kind in self.order if found[kind]}


_IMAGE_SIZES = ("tiny", "small", "base", "base_plus", "large", "huge")
_VIDEO_SIZES = ("base", "base_plus", "large", "huge")


def _build_table() -> dict[str, Pretrained]:
    table: dict[str, Pretrained] = {}
    for size in _IMAGE_SIZES:
        name, dashed = f"hiera_{size}_224", f"hiera-{size.replace('_', '-')}-224"
        table[name] = Pretrained(
            model=name,
            model_type="classification",
            tag="mae_in1k_ft_in1k",
            hf=f"facebook/{dashed}-in1k-hf",
            timm=f"timm/{name}.mae_in1k_ft_in1k",
            url=OFFICIAL_URL.format(file=name),
            aliases=(f"{name}.mae_in1k_ft_in1k",),
        )
        table[f"mae_{name}"] = Pretrained(
            model=f"mae_{name}",
            model_type="pretraining",
            tag="mae_in1k",
            hf=f"facebook/{dashed}-mae-hf",
            url=OFFICIAL_URL.format(file=f"mae_{name}"),
            aliases=(f"mae_{name}.mae_in1k",),
        )
        # The MAE encoder alone (HieraModel): timm's `.mae` keeps the trained encoder_norm as its
        # pooled-output norm; the transformers `-hf` repo has an untrained (identity) one there.
        table[f"{name}.mae"] = Pretrained(
            model=name,
            model_type="backbone",
            tag="mae_in1k",
            hf=f"facebook/{dashed}-hf",
            timm=f"timm/{name}.mae",
            aliases=(f"{name}.mae_in1k",),
            order=("timm", "hf"),
        )
    for size in _VIDEO_SIZES:  # Kinetics-400; neither timm nor transformers has video Hiera
        name = f"hiera_{size}_16x224"
        table[name] = Pretrained(
            model=name,
            model_type="classification",
            tag="mae_k400_ft_k400",
            url=OFFICIAL_URL.format(file=name),
            aliases=(f"{name}.mae_k400_ft_k400",),
        )
        table[f"mae_{name}"] = Pretrained(
            model=f"mae_{name}",
            model_type="pretraining",
            tag="mae_k400",
            url=OFFICIAL_URL.format(file=f"mae_{name}"),
            aliases=(f"mae_{name}.mae_k400",),
        )
    return table


PRETRAINED: dict[str, Pretrained] = _build_table()
_ALIASES: dict[str, str] = {a: key for key, entry in PRETRAINED.items() for a in entry.aliases}
_BY_REPO: dict[str, Pretrained] = {
    repo: entry for entry in PRETRAINED.values() for repo in (entry.hf, entry.timm) if repo
}
_BY_URL: dict[str, Pretrained] = {e.url: e for e in PRETRAINED.values() if e.url}


def list_pretrained() -> list[str]:
    """Our names that have published weights (`hiera_jax.load_pretrained(name)` takes each)."""
    return sorted(PRETRAINED)


def _timm_names() -> dict[str, Pretrained]:
    """timm's `<name>.<tag>` -> entry: these names mean the timm hub weights."""
    return {e.timm.removeprefix("timm/"): e for e in PRETRAINED.values() if e.timm}


# ---------------------------------------------------------------------- cache locations
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_home() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.expanduser(os.path.expandvars(os.environ.get("HF_HOME") or default))


def hf_hub_cache() -> str:
    """The Hugging Face hub cache (`$HF_HUB_CACHE`, default `$HF_HOME/hub`), read at call time."""
    path = os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home(), "hub")
    return os.path.expanduser(os.path.expandvars(path))


def cache_dir() -> str:
    """Where converted checkpoints and downloads live: `$HIERA_JAX_CACHE` or `$HF_HOME/hiera_jax`."""
    path = os.environ.get("HIERA_JAX_CACHE") or os.path.join(hf_home(), "hiera_jax")
    return os.path.expanduser(os.path.expandvars(path))


def is_offline() -> bool:
    """`HF_HUB_OFFLINE=1` (read now, or when huggingface_hub was imported): no downloads."""
    if _env_flag("HF_HUB_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


# ---------------------------------------------------------------------- name resolution
def resolve_pretrained(
    name_or_path: str | os.PathLike,
    *,
    source: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> str:
    """A local hiera-jax model directory for a name, repo id, URL or path (see the module doc).

    A path that does not exist is returned unchanged (the loader then says what is wrong with
    it). Raises `PretrainedNotFoundError` (a FileNotFoundError) with one line saying what was
    needed and where to put it when a checkpoint cannot be found or downloaded, and ValueError
    for unknown names and checkpoints that fit no official variant.
    """
    text = os.fspath(name_or_path)
    if source is not None and source not in SOURCE_KINDS:
        raise ValueError(f"source must be one of {SOURCE_KINDS}, got {source!r}")
    if os.path.exists(text):
        return _resolve_local(text)
    key = _ALIASES.get(text, text)
    timm_entry = _timm_names().get(text)
    if key in PRETRAINED or timm_entry is not None:
        entry = PRETRAINED.get(key) or timm_entry
        if source is None and timm_entry is not None:
            source = "timm"  # `hiera_base_224.mae_in1k_ft_in1k`: timm's name for these weights
        return _resolve_entry(text, entry, source, revision, token)
    if text.startswith("hf-hub:"):
        return _resolve_hf(text.removeprefix("hf-hub:"), revision, token)
    scheme = urllib.parse.urlparse(text).scheme
    if scheme in ("http", "https", "file"):
        return _resolve_url(text, _BY_URL.get(text))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and text.split("/")[0] in HUB_ORGS:
        return _resolve_hf(text, revision, token)
    if os.sep in text or text.startswith((".", "~")) or (os.altsep and os.altsep in text):
        return text  # a path that does not exist: the loader explains
    close = difflib.get_close_matches(text, [*PRETRAINED, *_ALIASES], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(
        f"{text!r} is not a local path nor a pretrained name{hint}: give a model directory, a "
        f"checkpoint file, a Hugging Face repo (facebook/..., timm/..., hf-hub:owner/name), a "
        f".pth URL, or one of {', '.join(list_pretrained())}"
    )


def _resolve_entry(
    text: str, entry: Pretrained, source: str | None, revision: str | None, token: Any
) -> str:
    sources = entry.sources
    if source is not None and source not in sources:
        raise ValueError(
            f"{text} has no {source!r} source; it is published as: "
            + ", ".join(f"{k} {v}" for k, v in sources.items())
        )
    kinds = [source] if source else list(sources)
    errors: list[PretrainedNotFoundError] = []
    for kind in kinds:  # an unqualified name falls back to its other sources (e.g. cached)
        try:
            if kind == "official":
                return _resolve_url(sources[kind], entry)
            return _resolve_hf(sources[kind], revision, token, entry)
        except PretrainedNotFoundError as err:
            errors.append(err)
    others = "; ".join(f"{kind} source {sources[kind]}" for kind in kinds[1:])
    also = f" (nor could it come from its other sources: {others})" if others else ""
    raise PretrainedNotFoundError(f"{text}: {errors[0]}{also}") from None


def _resolve_local(path: str) -> str:
    """A model directory (ours, older ours, transformers') as is; a PyTorch file or another
    directory of weights (timm's) converted once."""
    if os.path.isdir(path):
        weights = [os.path.join(path, f) for f in WEIGHT_FILES]
        weights = [w for w in weights if os.path.isfile(w)]
        if not weights or directory_lib.is_model_directory(path):
            return path  # a model directory, a workdir, or anything else: the loader explains
        weight_file = weights[0]
        config = os.path.join(path, CONFIG_FILE)
        extra_config = config if os.path.isfile(config) else None
    else:
        weight_file, extra_config = path, None
    stats = [os.stat(p) for p in (weight_file, extra_config) if p]
    fingerprint = "\0".join(
        [os.path.realpath(weight_file), *(f"{s.st_size}:{s.st_mtime_ns}" for s in stats)]
    )
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    base = os.path.join(cache_dir(), "local", f"{_safe(os.path.basename(path))}-{digest}")
    origin = {"kind": "local", "path": os.path.abspath(path)}
    return _convert_cached(base, weight_file, origin, None, extra_config)


# ---------------------------------------------------------------------- Hugging Face hub
def _resolve_hf(
    repo_id: str, revision: str | None, token: Any, entry: Pretrained | None = None
) -> str:
    """The repo's snapshot folder when it is a model directory (transformers' or ours: its
    config.json decides the architecture); timm's repos converted once."""
    entry = entry or _BY_REPO.get(repo_id)
    folder = _hf_snapshot(repo_id, revision, token)
    weights = [os.path.join(folder, f) for f in WEIGHT_FILES]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        raise PretrainedNotFoundError(
            _hf_missing_message(repo_id, revision, f"{' or '.join(WEIGHT_FILES)} in {folder}")
        )
    if directory_lib.is_model_directory(folder):
        if entry is not None:
            _, model_type = directory_lib.read_config(folder)
            if model_type != entry.model_type:
                raise ValueError(
                    f"{repo_id} holds a {model_type} checkpoint, but {entry.model} "
                    f"({entry.model_type}) was expected"
                )
        return folder
    commit = os.path.basename(os.path.normpath(folder))
    base = os.path.join(cache_dir(), "hf", _safe(repo_id.replace("/", "--")), _safe(commit))
    origin = {"kind": "hf", "repo": repo_id, "revision": revision or "main", "commit": commit}
    config = os.path.join(folder, CONFIG_FILE)
    return _convert_cached(
        base, weights[0], origin, entry, config if os.path.isfile(config) else None
    )


def _hf_snapshot(
    repo_id: str,
    revision: str | None,
    token: Any,
    weight_groups: tuple[tuple[str, ...], ...] = ((*WEIGHT_FILES[:2],), (WEIGHT_FILES[2],)),
) -> str:
    """The snapshot folder holding the repo's config and weights (downloaded if allowed).

    The repo's `*.json` files come with the first group of weight files the repo has (the
    groups are tried in order; `hiera_jax.weights.hieradet_loading` passes SAM 2's).
    """
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError as err:  # a base dependency, but say so if it is missing
        raise ImportError(
            "loading from the Hugging Face hub needs huggingface_hub: pip install huggingface_hub"
        ) from err
    kwargs = dict(
        revision=revision,
        token=token,
        cache_dir=hf_hub_cache(),
        local_files_only=is_offline(),
    )
    try:
        first, *others = weight_groups
        folder = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=["*.json", *first], **kwargs
        )
        for group in others:
            if any(os.path.isfile(os.path.join(folder, f)) for f in first):
                break
            folder = huggingface_hub.snapshot_download(
                repo_id, allow_patterns=list(group), **kwargs
            )
            first = group
    except hf_errors.RepositoryNotFoundError as err:
        raise PretrainedNotFoundError(
            f"Hugging Face repo {repo_id} not found (or private or gated: pass token=...): "
            f"{_one_line(err)}"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise PretrainedNotFoundError(
            f"Hugging Face repo {repo_id} has no revision {revision!r}"
        ) from None
    except (hf_errors.LocalEntryNotFoundError, OSError, hf_errors.HfHubHTTPError) as err:
        raise PretrainedNotFoundError(
            _hf_missing_message(repo_id, revision, "config.json and model.safetensors", err)
        ) from None
    except Exception as err:  # e.g. IncompleteSnapshotError, connection errors of httpx
        if type(err).__module__.split(".")[0] not in _HTTP_MODULES:
            raise
        raise PretrainedNotFoundError(
            _hf_missing_message(repo_id, revision, "config.json and model.safetensors", err)
        ) from None
    return folder


def _hf_missing_message(
    repo_id: str, revision: str | None, needed: str, err: Exception | None = None
) -> str:
    rev = f" (revision {revision})" if revision else ""
    if is_offline():
        why = "downloads are off (HF_HUB_OFFLINE=1)"
    elif err is not None:
        why = f"the download failed ({_one_line(err)})"
    else:
        why = "the snapshot is incomplete"
    return (
        f"{repo_id}{rev} is not in the Hugging Face cache {hf_hub_cache()} and {why}: it needs "
        f"{needed} from https://huggingface.co/{repo_id}; run `hf download {repo_id}` with "
        f"HF_HOME={hf_home()} where there is network, or download the files into a folder and "
        "pass that folder's path"
    )


def _one_line(err: BaseException | None) -> str:
    text = " ".join(str(err).split()) if err is not None else ""
    text = f"{type(err).__name__}: {text}" if err is not None else ""
    return text if len(text) < 300 else text[:297] + "..."


def upload_folder(
    folder: str,
    repo_id: str,
    *,
    commit_message: str = "Upload model",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload `folder` to the Hugging Face model repo `repo_id` (created if needed) with
    huggingface_hub; returns its commit info. What `push_to_hub` does, for models and processors."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )


# ---------------------------------------------------------------------- official URLs
def _resolve_url(url: str, entry: Pretrained | None) -> str:
    filename = _url_filename(url)
    record = _download_path(filename) + ".sha256"
    sha = _read_record(record) or _hash_prefix(filename)
    stem = _safe(os.path.splitext(filename)[0])
    if sha and len(sha) >= 16:  # known content: a converted copy may exist without the .pth
        converted = _find_converted(os.path.join(cache_dir(), "official", stem, sha[:16]), entry)
        if converted:
            return converted
    path = download_url(url)
    sha = _read_record(path + ".sha256")
    base = os.path.join(cache_dir(), "official", stem, sha[:16])
    origin = {"kind": "official", "url": url, "file": path, "sha256": sha}
    if entry is not None:
        origin["checkpoint_key"] = entry.url_key
    return _convert_cached(base, path, origin, entry)


def _url_filename(url: str) -> str:
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f"cannot tell a file name from the URL {url}")
    return name


def _download_path(filename: str) -> str:
    return os.path.join(cache_dir(), "downloads", filename)


def _hash_prefix(filename: str) -> str | None:
    match = _HASH_PREFIX.search(filename)
    return match[1] if match else None


def _read_record(path: str) -> str | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return text if re.fullmatch(r"[0-9a-f]{64}", text) else None


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str, filename: str | None = None) -> str:
    """The file's sha256, checked against its name's prefix and its recorded `.sha256`.

    A file with neither (placed by hand) gets its sha256 recorded now; ChecksumError if the
    content does not match.
    """
    filename = filename or os.path.basename(path)
    sha = sha256_file(path)
    prefix = _hash_prefix(filename)
    record_path = path + ".sha256"
    recorded = _read_record(record_path)
    expected = recorded or (prefix if prefix else None)
    if (prefix and not sha.startswith(prefix)) or (recorded and sha != recorded):
        raise ChecksumError(
            f"cached file {path} is corrupted: sha256 {sha} does not match the expected "
            f"{expected}; delete it (and {record_path}) to download it again"
        )
    if recorded is None:
        _write_text(record_path, sha + "\n")
    return sha


def download_url(url: str) -> str:
    """The local copy of `url` in `cache_dir()/downloads`, downloaded once and verified each call.

    Downloads are refused while `HF_HUB_OFFLINE=1` (except `file://` URLs); a missing file then
    raises PretrainedNotFoundError saying where to put it.
    """
    filename = _url_filename(url)
    path = _download_path(filename)
    if os.path.isfile(path):
        verify_file(path, filename)
        return path
    where = (
        f"download {url} and put it at {path} (its sha256 is recorded on first use), or pass "
        "the downloaded file's path instead of the name"
    )
    if is_offline() and urllib.parse.urlparse(url).scheme != "file":
        raise PretrainedNotFoundError(
            f"{filename} is not in the cache and downloads are off (HF_HUB_OFFLINE=1): {where}"
        )
    try:
        _fetch(url, path)
    except ChecksumError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise PretrainedNotFoundError(
            f"cannot download {filename} ({_one_line(err)}): {where}"
        ) from None
    return path


def _fetch(url: str, path: str) -> None:
    """Stream `url` to `path` (via a temporary file), checking a file-name hash prefix."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.partial"
    digest = hashlib.sha256()
    if urllib.parse.urlparse(url).scheme != "file":
        print(f"hiera_jax: downloading {url} to {path}", file=sys.stderr)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "hiera-jax"})
        with urllib.request.urlopen(request, timeout=60) as response, open(tmp, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        sha = digest.hexdigest()
        prefix = _hash_prefix(os.path.basename(path))
        if prefix and not sha.startswith(prefix):
            raise ChecksumError(
                f"downloaded {url} has sha256 {sha}, which does not start with the {prefix} its "
                "name promises; not cached"
            )
        os.replace(tmp, path)
        _write_text(path + ".sha256", sha + "\n")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- conversion, once
def _find_converted(base: str, entry: Pretrained | None) -> str | None:
    """A finished conversion under `base` (for `entry`'s variant if given), or None."""
    if not os.path.isdir(base):
        return None
    wanted = f"{entry.model}-{entry.model_type}" if entry is not None else None
    names = sorted(os.listdir(base))
    for name in names if wanted is None else [wanted]:
        directory = os.path.join(base, name)
        if os.path.isfile(os.path.join(directory, CONFIG_FILE)) and os.path.isfile(
            os.path.join(directory, SOURCE_FILE)
        ):
            return directory
    return None


def _convert_cached(
    base: str,
    weight_file: str,
    origin: dict[str, Any],
    entry: Pretrained | None,
    config_file: str | None = None,
) -> str:
    """Convert `weight_file` into `base/<variant>-<model_type>` unless it is there already.

    For checkpoints without a Hiera config.json (official `.pth`, timm): the variant is the one
    timm's `config_file` names (`"architecture"`), or is read from the tensors (`infer_variant`).
    """
    converted = _find_converted(base, entry)
    if converted:
        return converted
    state_dict, _ = formats.read_state_dict(weight_file)
    state_dict = convert_lib.unwrap_state_dict(state_dict)
    timm_config = directory_lib.read_json(config_file) if config_file else None
    architecture = timm_config.get("architecture") if isinstance(timm_config, dict) else None
    name, model_type, overrides = infer_variant(state_dict, architecture)
    if entry is not None and (name, model_type) != (entry.model, entry.model_type):
        raise ValueError(
            f"{weight_file} holds a {model_type} {name} checkpoint, but {entry.model} "
            f"({entry.model_type}) was expected"
        )
    config = get_config(name, **overrides)
    print(
        f"hiera_jax: converting {weight_file} ({name}, {model_type}) into {base} (once)",
        file=sys.stderr,
    )
    params = convert_lib.convert_state_dict(state_dict, config, "auto", model_type=model_type)
    dest = os.path.join(base, f"{name}-{model_type}")
    tmp = f"{dest}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(tmp, params, config, model_type=model_type)
    _write_text(os.path.join(tmp, SOURCE_FILE), json.dumps(origin, indent=2) + "\n")
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(dest):
            raise
    return dest


# ---------------------------------------------------------------------- variant inference
def infer_variant(
    state_dict: Mapping[str, Any], architecture: str | None = None
) -> tuple[str, str, dict[str, int]]:
    """(variant name, model type, config overrides) of a PyTorch Hiera state dict in any format.

    `architecture` (the variant timm's config.json names) is taken when it is one of ours and the
    tensors' width and depth fit it; otherwise the width and block count (and for Hugging Face
    keys the blocks per stage) pick the official variant. The key names give the model type
    (`formats.model_type_of_keys`); `num_classes` and `in_chans` are overridden when the tensors
    say so.
    """
    state_dict = convert_lib.unwrap_state_dict(state_dict)
    if formats.is_hieradet_keys(state_dict):
        raise formats.OtherFamily(
            "the checkpoint is SAM 2's Hiera (HieraDet: it has a pos_embed_window table), not "
            f"Hiera: load it with {formats.HIERADET_LOADER}",
            family="hieradet",
        )
    patch = head = None
    blocks: set[int] = set()
    hf_layers: dict[int, set[int]] = {}
    model_type = formats.model_type_of_keys(state_dict)
    pretraining = model_type == "pretraining"
    for key, value in state_dict.items():
        key = key.removeprefix("hiera.")
        if key in ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"):
            patch = value
        elif key in ("head.projection.weight", "head.fc.weight", "classifier.weight"):
            head = value
        elif match := re.match(r"blocks\.(\d+)\.", key):
            blocks.add(int(match[1]))
        elif match := re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.", key):
            hf_layers.setdefault(int(match[1]), set()).add(int(match[2]))
    if patch is None:
        raise ValueError(
            "the checkpoint has no patch embedding (patch_embed.proj.weight): not a Hiera "
            f"state dict? first keys: {sorted(state_dict)[:8]}"
        )
    shape = tuple(getattr(patch, "shape", ()))
    embed_dim, in_chans, video = shape[0], shape[1], len(shape) == 5
    stages = tuple(len(hf_layers[s]) for s in sorted(hf_layers)) if hf_layers else None
    depth = sum(stages) if stages else len(blocks)
    named = {**VARIANTS, **TIMM_VARIANTS}.get(architecture or "")
    if named is not None and (named["embed_dim"], sum(named["stages"])) != (embed_dim, depth):
        raise ValueError(
            f"the checkpoint's config.json names {architecture}, but its tensors are "
            f"{embed_dim} wide and {depth} blocks deep"
        )
    candidates = (
        [architecture]
        if named is not None
        else [
            name
            for name, kw in VARIANTS.items()
            if kw["embed_dim"] == embed_dim
            and sum(kw["stages"]) == depth
            and (stages is None or tuple(kw["stages"]) == stages)
            and ("input_size" in kw) == video
            and name.startswith("mae_") == pretraining
        ]
    )
    if len(candidates) != 1:
        kind = "video" if video else "image"
        raise ValueError(
            f"the checkpoint (width {embed_dim}, {depth} blocks, {kind}, "
            f"{'with' if pretraining else 'no'} MAE decoder) fits no official variant "
            f"{candidates or ''}; convert it with hiera-jax-convert --model NAME"
        )
    name = candidates[0]
    config = get_config(name)
    overrides: dict[str, int] = {}
    if in_chans != config.in_chans:
        overrides["in_chans"] = int(in_chans)
    if head is not None and tuple(head.shape)[0] != config.num_classes:
        overrides["num_classes"] = int(tuple(head.shape)[0])
    return name, model_type, overrides
