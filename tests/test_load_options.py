"""Hugging Face load options (`model.revision`, `model.attn_implementation`, `model.trust_remote_code`): parsed by
the config, carried by `RunContext.load_options`, and given to every loader of a run's models and tokenizers. All
in-process, on tiny random-weight checkpoints written locally (no hub download)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import Rows, RunContext, StagePlan, TargetsPlan
from bcoder_ray.algorithms.coderl.algorithm import load_trainable_lm
from bcoder_ray.algorithms.coderl.critic import FOUR_CLASSES, Critic, check_critic_tokenizer
from bcoder_ray.algorithms.lm_policy import fingerprint, load_policy
from bcoder_ray.algorithms.bcoder.q_model import QModel
from bcoder_ray.algorithms.bcoder.targets import targets_fingerprint
from bcoder_ray.model.candidates import load_sampler
from bcoder_ray.loop.components import run_context
from bcoder_ray.config import config_from_data, load_config, read_yaml
from bcoder_ray.model.lm import LoadOptions, checkpoint_identity, load_lm
from bcoder_ray.loop.rollout import PolicyRef, PolicyWorker, WorkerArgs
from bcoder_ray.loop.run_folder import CONFIG_FILE, RunState, load_run
from bcoder_ray.model.tokenization import load_tokenizer
from learner_fixtures import tiny_checkpoint

EAGER = LoadOptions(attn_implementation="eager")
SDPA = LoadOptions(attn_implementation="sdpa")


def _attn(module) -> str:
    return module.config._attn_implementation


def _save_tokenizer(directory: str | Path) -> str:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "def": 3, "f": 4, "return": 5}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(directory))
    return str(directory)


def _checkpoint(kind: str, directory: Path) -> str:
    path = tiny_checkpoint(kind, str(directory))
    return _save_tokenizer(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("load_options")
    return {kind: _checkpoint(kind, root / kind.replace("-", "_")) for kind in ("decoder-only", "encoder-decoder",
                                                                               "llama")}


# ---------------------------------------------------------------------------------------------- a custom-code folder
_CONFIGURATION = '''from transformers import GPT2Config


class TinyCustomConfig(GPT2Config):
    model_type = "bcoder-test-custom-gpt2"
'''
_MODELING = '''from transformers import GPT2LMHeadModel, GPT2Model

from .configuration_bcoder_test_custom import TinyCustomConfig


class TinyCustomModel(GPT2Model):
    config_class = TinyCustomConfig


class TinyCustomForCausalLM(GPT2LMHeadModel):
    config_class = TinyCustomConfig
'''
_TOKENIZATION = '''from transformers import PreTrainedTokenizerFast


class TinyCustomTokenizerFast(PreTrainedTokenizerFast):
    pass
'''


def _custom_code_checkpoint(directory: Path) -> str:
    """A GPT-2 whose config.json (and tokenizer_config.json) `auto_map` points at modelling code in the folder,
    under a model_type transformers does not know: loadable only with trust_remote_code."""
    path = _checkpoint("decoder-only", directory)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.update(model_type="bcoder-test-custom-gpt2", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_bcoder_test_custom.TinyCustomConfig",
                            "AutoModel": "modeling_bcoder_test_custom.TinyCustomModel",
                            "AutoModelForCausalLM": "modeling_bcoder_test_custom.TinyCustomForCausalLM"})
    config_file.write_text(json.dumps(config))
    tokenizer_file = directory / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    tokenizer.update(tokenizer_class="TinyCustomTokenizerFast",
                     auto_map={"AutoTokenizer": [None, "tokenization_bcoder_test_custom.TinyCustomTokenizerFast"]})
    tokenizer_file.write_text(json.dumps(tokenizer))
    for name, text in (("configuration", _CONFIGURATION), ("modeling", _MODELING), ("tokenization", _TOKENIZATION)):
        (directory / f"{name}_bcoder_test_custom.py").write_text(text)
    return path


@pytest.fixture(scope="module")
def custom(tmp_path_factory) -> str:
    return _custom_code_checkpoint(tmp_path_factory.mktemp("custom") / "bcoder_test_custom_ckpt")


TRUST = LoadOptions(trust_remote_code=True, attn_implementation="eager")
REFUSED = r"(?s)contains custom code.*trust_remote_code=True"  # transformers' own error


# ---------------------------------------------------------------------------------------------- the options object
def test_kwargs_carry_only_what_is_set():
    assert LoadOptions().config_kwargs() == LoadOptions().model_kwargs() == {"trust_remote_code": False}
    full = LoadOptions(revision="v1.2", attn_implementation="eager", trust_remote_code=True)
    assert full.config_kwargs() == {"revision": "v1.2", "trust_remote_code": True}  # no attn: a model option
    assert full.model_kwargs() == {"revision": "v1.2", "trust_remote_code": True, "attn_implementation": "eager"}
    # the revision names a version of θ_ckpt: other sources (another hub repo, a saved folder) do not get it
    assert full.for_source("org/model", "org/model") == full
    assert full.for_source("org/tokenizer", "org/model").revision is None
    assert full.for_source("runs/x/theta", "org/model") == LoadOptions(attn_implementation="eager",
                                                                       trust_remote_code=True)
    ctx = RunContext(theta_ckpt="org/model", tokenizer_path="org/tok", source_len=8, target_len=8,
                     load_options=full)
    assert pickle.loads(pickle.dumps(ctx)) == ctx          # Ray pickles it for its workers and actors
    assert ctx.options_for() == full and ctx.options_for("org/tok").revision is None


# ---------------------------------------------------------------------------------------------- attn_implementation
@pytest.mark.parametrize("kind", ["decoder-only", "encoder-decoder", "llama"])
def test_attn_implementation_reaches_load_lm(checkpoints, kind):
    assert _attn(load_lm(checkpoints[kind], options=EAGER)) == "eager"
    assert _attn(load_lm(checkpoints[kind], options=SDPA)) == "sdpa"


@pytest.mark.parametrize("kind", ["decoder-only", "encoder-decoder"])
def test_attn_implementation_reaches_every_part_of_the_q_model(checkpoints, kind, tmp_path):
    ckpt = checkpoints[kind]
    model = QModel.create(ckpt, options=EAGER)
    assert [_attn(m) for m in (model.ckpt.lm, model.phi.body, model.theta.lm)] == ["eager"] * 3
    model.save_theta(str(tmp_path / "theta"))
    model.save_phi(str(tmp_path / "phi"))
    for options, want in ((EAGER, "eager"), (SDPA, "sdpa")):
        saved = QModel.create(ckpt, parts=("ckpt", "theta", "phi"), theta_dir=str(tmp_path / "theta"),
                              phi_dir=str(tmp_path / "phi"), options=options)
        assert [_attn(m) for m in (saved.ckpt.lm, saved.theta.lm, saved.phi.body)] == [want] * 3


def test_attn_implementation_reaches_the_sampler_and_the_rollout_worker(checkpoints, monkeypatch):
    ckpt = checkpoints["llama"]
    assert _attn(load_sampler(ckpt, options=EAGER).lm.lm) == "eager"
    assert _attn(load_sampler(ckpt, options=LoadOptions(attn_implementation="sdpa")).lm.lm) == "sdpa"
    monkeypatch.setattr("bcoder_ray.loop.rollout.quiet_libraries", lambda: None)
    threads = torch.get_num_threads()
    try:
        for attn in ("eager", "sdpa"):
            args = WorkerArgs(problems={}, num_threads=threads,
                              context=RunContext(theta_ckpt=ckpt, tokenizer_path=ckpt, source_len=16, target_len=8,
                                                 load_options=LoadOptions(attn_implementation=attn)))
            sampler = PolicyWorker(args)._sampler(PolicyRef(path=ckpt, version="0"))
            assert _attn(sampler.lm.lm) == attn
    finally:
        torch.set_num_threads(threads)


def test_attn_implementation_reaches_the_policy_actor_and_critic_loaders(checkpoints, tmp_path):
    ckpt = checkpoints["decoder-only"]
    assert _attn(load_policy(ckpt, trainable=True, options=EAGER).lm) == "eager"
    assert _attn(load_policy(ckpt, trainable=False, options=SDPA).lm) == "sdpa"
    assert _attn(load_trainable_lm(ckpt, options=EAGER)) == "eager"
    critic = Critic.create(ckpt, options=EAGER)
    assert _attn(critic.body) == "eager"
    critic.save(str(tmp_path / "critic"))
    assert _attn(Critic.load(str(tmp_path / "critic"), options=EAGER).body) == "eager"
    assert _attn(Critic.load(str(tmp_path / "critic"), options=SDPA).body) == "sdpa"


def _ctx(ckpt: str, options: LoadOptions, **kw) -> RunContext:
    return RunContext(theta_ckpt=ckpt, tokenizer_path=ckpt, source_len=16, target_len=8,
                      load_options=options, **kw)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_algorithms_load_with_the_context_options(checkpoints, tmp_path, attn):
    ckpt = checkpoints["decoder-only"]
    ctx = _ctx(ckpt, LoadOptions(attn_implementation=attn))
    bcoder = make_algorithm("bcoder", {"name": "bcoder"}, ctx)
    phi = bcoder.build_stage(StagePlan("phi", Rows(), spec={"phi_dir": None}))
    theta = bcoder.build_stage(StagePlan("theta", Rows(), spec={"theta_dir": None}))
    assert _attn(phi.model.phi.body) == _attn(theta.model.theta.lm) == attn
    phi.save(str(tmp_path / "phi"))
    theta.save(str(tmp_path / "theta"))
    ranker = bcoder.load_ranker({"theta_dir": str(tmp_path / "theta"), "phi_dir": str(tmp_path / "phi")}, "r")
    assert _attn(ranker.model.theta.lm) == _attn(ranker.model.phi.body) == attn
    ppo = make_algorithm("ppo", {"name": "ppo"}, ctx)
    assert _attn(ppo.build_stage(StagePlan("ppo", Rows(), spec={"start": None})).policy.lm) == attn
    coderl = make_algorithm("coderl", {"name": "coderl"}, ctx)
    critic = coderl.build_stage(StagePlan("critic", Rows(), spec={"classes": list(FOUR_CLASSES)}))
    actor = coderl.build_stage(StagePlan("actor", Rows(), spec={}))
    assert _attn(critic.critic.body) == _attn(actor.policy.lm) == attn
    critic.save(str(tmp_path / "critic"))
    assert _attn(coderl.load_ranker({"critic_dir": str(tmp_path / "critic")}, "c").critic.body) == attn


# ---------------------------------------------------------------------------------------------- trust_remote_code
def test_custom_code_loads_only_when_trusted(custom, tmp_path):
    with pytest.raises(ValueError, match=REFUSED):
        load_lm(custom)
    with pytest.raises(ValueError, match=REFUSED):
        QModel.create(custom, parts=("ckpt",))
    with pytest.raises(ValueError, match=REFUSED):
        load_tokenizer(custom, options=LoadOptions())
    lm = load_lm(custom, options=TRUST)
    assert type(lm).__name__ == "TinyCustomForCausalLM" and _attn(lm) == "eager"
    assert type(load_tokenizer(custom, options=TRUST)).__name__ == "TinyCustomTokenizerFast"
    sampler = load_sampler(custom, options=TRUST)
    assert type(sampler.lm.lm).__name__ == "TinyCustomForCausalLM"
    assert type(sampler.tokenizer).__name__ == "TinyCustomTokenizerFast"


def test_custom_code_reaches_every_part_and_the_saved_folders(custom, tmp_path):
    model = QModel.create(custom, options=TRUST)
    assert {type(model.ckpt.lm).__name__, type(model.theta.lm).__name__} == {"TinyCustomForCausalLM"}
    model.save_theta(str(tmp_path / "theta"))
    model.save_phi(str(tmp_path / "phi"))
    assert (tmp_path / "phi" / "modeling_bcoder_test_custom.py").is_file()  # the code its auto_map names
    dirs = {"theta_dir": str(tmp_path / "theta"), "phi_dir": str(tmp_path / "phi")}
    saved = QModel.create(custom, parts=("theta", "phi"), options=TRUST, **dirs)
    assert type(saved.theta.lm).__name__ == "TinyCustomForCausalLM"
    assert type(saved.phi.body).__name__ == "TinyCustomModel" and _attn(saved.phi.body) == "eager"
    torch.testing.assert_close(saved.theta.lm.lm_head.weight, model.theta.lm.lm_head.weight)
    with pytest.raises(ValueError, match=REFUSED):
        QModel._load_phi(dirs["phi_dir"], "decoder-only", None, None, LoadOptions())
    critic = Critic.create(custom, options=TRUST)
    critic.save(str(tmp_path / "critic"))
    assert type(Critic.load(str(tmp_path / "critic"), options=TRUST).body).__name__ == "TinyCustomModel"
    with pytest.raises(ValueError, match=REFUSED):
        Critic.load(str(tmp_path / "critic"))
    # the CodeRL tokenizer check loads both tokenizers with their options
    assert check_critic_tokenizer(custom, custom, critic_options=TRUST, actor_options=TRUST)
    with pytest.raises(ValueError, match="custom code"):
        check_critic_tokenizer(custom, custom, critic_options=TRUST, actor_options=LoadOptions())


# ---------------------------------------------------------------------------------------------- config
def _tiny(overrides: list[str]):
    data, where = read_yaml("ci_tiny")
    return config_from_data(data, where, overrides, check_paths=False)


def test_the_fields_parse_from_overrides_and_yaml_and_reach_the_run_context(tmp_path):
    cfg = _tiny([])
    assert (cfg.model.revision, cfg.model.attn_implementation, cfg.model.trust_remote_code) == (None, None, False)
    assert run_context(cfg, "org/model").load_options == LoadOptions()
    cfg = _tiny(["--model.revision", "v2.0", "--model.attn_implementation", "eager",
                 "--model.trust_remote_code", "true"])
    want = {"revision": "v2.0", "attn_implementation": "eager", "trust_remote_code": True}
    assert cfg.model.load_options() == LoadOptions(**want) and cfg.model.trust_remote_code is True
    ctx = run_context(cfg, "org/model")
    assert ctx.load_options == ctx.options_for() == LoadOptions(**want)
    assert pickle.loads(pickle.dumps(ctx)) == ctx  # as the driver ships it (Ray pickles it)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"revision": "abc123", "attn_implementation": "sdpa",
                                              "trust_remote_code": True}}))
    cfg = load_config(path, check_paths=False)
    assert cfg.model.load_options() == LoadOptions(revision="abc123", attn_implementation="sdpa",
                                                   trust_remote_code=True)
    # a run folder read back (the command-line tools) carries them too
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
    RunState(theta_ckpt="org/model").save(run_dir)
    assert load_run(run_dir).context().load_options == cfg.model.load_options()


# ---------------------------------------------------------------------------------------------- revision
def test_a_revision_on_a_local_folder_does_not_break_loading(checkpoints, tmp_path):
    options = LoadOptions(revision="no-such-branch", attn_implementation="eager")
    for kind in ("decoder-only", "encoder-decoder"):
        assert _attn(load_lm(checkpoints[kind], options=options)) == "eager"
        model = QModel.create(checkpoints[kind], options=options)
        model.save_phi(str(tmp_path / kind / "phi"))
        QModel.create(checkpoints[kind], parts=("phi",), phi_dir=str(tmp_path / kind / "phi"), options=options)
    assert load_tokenizer(checkpoints["decoder-only"], options=options).eos_token == "<eos>"
    assert load_sampler(checkpoints["llama"], options=options).tokenizer.eos_token == "<eos>"


def test_the_revision_is_part_of_the_targets_identity(checkpoints, tmp_path):
    assert checkpoint_identity("org/model") == checkpoint_identity("org/model", None) == "name:org/model"
    ids = {checkpoint_identity("org/model", r) for r in (None, "main", "v1", "0123abcd")}
    assert len(ids) == 4
    local = checkpoints["decoder-only"]
    assert checkpoint_identity(local, "v1") == checkpoint_identity(local)      # a folder: its content says which
    tok = load_tokenizer(local)
    base = dict(max_prompt_len=16, max_program_len=8, alpha=1.0)
    unset = targets_fingerprint("org/model", tok, **base)
    assert targets_fingerprint("org/model", tok, revision=None, **base) == unset  # runs without one: unchanged
    assert len({unset, targets_fingerprint("org/model", tok, revision="v1", **base),
                targets_fingerprint("org/model", tok, revision="v2", **base)}) == 3
    # what the algorithms plan: B-Coder's target fingerprint and the LM-policy fingerprint follow model.revision
    plans = []
    for revision in ("v1", "v2", None):
        ctx = RunContext(theta_ckpt="org/model", tokenizer_path=local, source_len=16, target_len=8,
                         load_options=LoadOptions(revision=revision))
        algo = make_algorithm("bcoder", {"name": "bcoder", "alpha": 0.5}, ctx)
        targets = algo._targets(None, needs_actions=True)
        assert isinstance(targets, TargetsPlan)
        plans.append((targets.fingerprint, fingerprint(ctx, tok)))
    assert len({p[0] for p in plans}) == 3 and len({p[1] for p in plans}) == 3
    assert plans[2][0] == targets_fingerprint("org/model", tok, max_prompt_len=16, max_program_len=8, alpha=0.5)
