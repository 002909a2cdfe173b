"""The Q model's parameter sets: initialisation equalities, value cap, stage freezing, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from bcoder_ray.model.batch import collate
from bcoder_ray.algorithms.bcoder.losses import phi_loss, theta_loss
from bcoder_ray.algorithms.bcoder.q_model import QModel, capped_value, load_lm, softabs, token_logit_stats
from learner_fixtures import FAMILIES, PAD, example_rows, perturb, tiny_checkpoint

torch.set_num_threads(1)
GAMMA = 0.999


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


def _examples():
    return example_rows(3)


def _all_action_q(model: QModel, batch, encoded):
    """Q_φ(s_t, ·) and Q_θ(s_t, ·) over the whole vocabulary, [B, T, V] each."""
    with torch.no_grad():
        l_ckpt = model.ckpt_logits(batch, encoded)
        v_phi = model.phi_raw_values(batch, encoded)
        q_phi = model.alpha * (l_ckpt - l_ckpt.max(-1, keepdim=True).values) + \
            capped_value(v_phi, model.r_max).unsqueeze(-1)
        out = model.theta_outputs(batch, encoded, v_phi)
        q_theta = model.alpha * (out.logits - out.max_logit.unsqueeze(-1)) + out.value.unsqueeze(-1)
    return l_ckpt, q_phi, q_theta


def test_softabs_caps_value_and_reaches_r_max():
    x = torch.tensor([-1e4, -30.0, -1.0, -1e-6, 0.0, 1e-6, 1.0, 30.0, 1e4])
    s = softabs(x)
    assert (s >= 0).all() and s[4] == 0
    expected = torch.log(torch.cosh(torch.tensor([-1.0, 1.0]) / 2))
    assert torch.allclose(s[[2, 6]], expected, atol=1e-6)
    assert torch.allclose(s[[1, 7]], torch.tensor([15 - 0.6931472] * 2), atol=1e-4)   # ~|x|/2 - ln 2
    assert capped_value(torch.zeros(()), 1.0) == 1.0
    assert (capped_value(x, 1.0) <= 1.0).all()


def test_init_equalities(checkpoint):
    model = QModel.create(checkpoint, alpha=0.7)
    batch = collate(_examples(), PAD)
    encoded = model.encode(batch)
    l_ckpt, q_phi, q_theta = _all_action_q(model, batch, encoded)
    mask = batch.program_mask.bool()
    # eq. 11: softmax(Q_φ/α) = p_ckpt exactly, whatever V_φ is
    assert torch.allclose((q_phi / model.alpha).softmax(-1)[mask], l_ckpt.softmax(-1)[mask], atol=1e-6)
    # eq. 16 with V^r_θ = h1 - h2 = 0 and ℓ_θ = ℓ_ckpt: Q_θ = Q_φ exactly
    assert torch.equal(q_theta[mask], q_phi[mask])
    assert not torch.allclose(q_phi[mask], q_phi[mask][0, 0])   # not a degenerate constant


def test_advantage_nonpositive_and_value_capped_after_training(checkpoint):
    model = QModel.create(checkpoint, parts=("phi", "theta"))
    perturb(model.freeze_for_stage("theta"), scale=2.0)
    perturb(model.freeze_for_stage("phi"), scale=2.0, seed=2)
    batch = collate(_examples(), PAD)
    encoded = model.encode(batch)
    with torch.no_grad():
        v_phi = model.phi_raw_values(batch, encoded)
        out = model.theta_outputs(batch, encoded, v_phi * 100)
        all_adv = model.alpha * (out.logits - out.max_logit.unsqueeze(-1))
    assert (all_adv <= 0).all() and (out.advantage <= 0).all()
    assert (all_adv.max(-1).values == 0).all()                   # the dueling max is attained
    assert (out.value <= model.r_max).all() and (capped_value(v_phi, model.r_max) <= model.r_max).all()
    assert out.value.min() < 0                                    # the heads do move V


def _named_ids(module, skip=()):
    return {id(p) for n, p in module.named_parameters() if not any(s in n for s in skip)}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("stage", ["phi", "theta"])
def test_each_stage_trains_exactly_its_parameters(checkpoint, stage):
    model = QModel.create(checkpoint)
    params = model.freeze_for_stage(stage)
    encoder_ids = _named_ids(model.encoder) if model.encoder is not None else set()
    if stage == "phi":
        expected = (_named_ids(model.phi.body) - encoder_ids) | _named_ids(model.phi.v_head)
    else:
        expected = (_named_ids(model.theta.lm) - encoder_ids) | _named_ids(model.theta.h1)
        assert not _named_ids(model.theta.h2) & expected
    assert {id(p) for p in params} == expected and len(params) == len(expected)
    assert all(p.requires_grad for p in params)
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected

    before = _snapshot(model)
    optimiser = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    batch = collate(_examples(), PAD)
    loss, _ = (phi_loss(model, batch, gamma=GAMMA) if stage == "phi" else theta_loss(model, batch, gamma=GAMMA))
    loss.backward()
    optimiser.step()
    trained = {id(p) for p in params}
    changed = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in trained:
            changed += int(not torch.equal(p, before[name]))
        else:
            assert p.grad is None, name
            assert torch.equal(p, before[name]), name
    assert changed >= len(params) // 2
    # the shared frozen encoder stays in eval mode while the stage trains
    if model.encoder is not None:
        assert not model.encoder.stack.training
    assert not model.ckpt.training and getattr(model, stage).training


def test_save_and_load_round_trip(checkpoint, tmp_path):
    model = QModel.create(checkpoint, parts=("phi", "theta"), alpha=0.5)
    perturb(model.freeze_for_stage("theta"), seed=3)
    perturb(model.freeze_for_stage("phi"), seed=4)
    model.save_theta(str(tmp_path / "theta"))
    model.save_phi(str(tmp_path / "phi"))

    batch = collate(_examples(), PAD)
    # the LM part loads as a plain LM with transformers alone
    plain_cls = AutoModelForSeq2SeqLM if model.kind == "encoder-decoder" else AutoModelForCausalLM
    plain = plain_cls.from_pretrained(str(tmp_path / "theta"))
    with torch.no_grad():
        encoded = model.encode(batch)
        mine = model.theta.logits(model.theta.states(batch, encoded))
    assert type(plain).__name__ == type(model.theta.lm).__name__
    for b, ex in enumerate(_examples()):
        p, w = torch.tensor([ex["prompt_ids"]]), torch.tensor([ex["program_ids"]])
        with torch.no_grad():
            if model.kind == "encoder-decoder":
                dec = torch.cat([torch.tensor([[model.decoder_start_id]]), w[:, :-1]], 1)
                ref = plain(input_ids=p, decoder_input_ids=dec).logits[0]
            else:
                ref = plain(input_ids=torch.cat([p, w[:, :-1]], 1)).logits[0, p.shape[1] - 1:]
        assert torch.allclose(ref, mine[b, : w.shape[1]], atol=1e-5)
    assert load_lm(str(tmp_path / "theta")).training is False   # this project's loader: frozen, eval

    loaded = QModel.create(checkpoint, parts=("phi", "theta"), phi_dir=str(tmp_path / "phi"),
                           theta_dir=str(tmp_path / "theta"))
    assert loaded.alpha == 0.5
    with torch.no_grad():
        enc2 = loaded.encode(batch)
        a = model.theta_outputs(batch, encoded, model.phi_raw_values(batch, encoded))
        b = loaded.theta_outputs(batch, enc2, loaded.phi_raw_values(batch, enc2))
    assert torch.allclose(a.q, b.q, atol=1e-5) and torch.allclose(a.value, b.value, atol=1e-6)
    if loaded.encoder is not None:   # one shared encoder, not one per network
        assert loaded.theta.lm.get_encoder() is loaded.encoder.stack
        assert loaded.phi.body.embed_tokens.weight is loaded.encoder.embedding.weight
    with pytest.raises(ValueError, match="alpha"):
        QModel.create(checkpoint, parts=("theta",), theta_dir=str(tmp_path / "theta"), alpha=1.0)


def test_plain_dueling_dqn_option(checkpoint, tmp_path):
    model = QModel.create(checkpoint, parts=("ckpt", "theta"), init_from_lm=False)
    assert not model.theta.uses_phi
    batch = collate(_examples(), PAD)
    encoded = model.encode(batch)
    with torch.no_grad():
        out = model.theta_outputs(batch, encoded, None)
        l_ckpt = model.ckpt_logits(batch, encoded)
    assert not torch.allclose(out.logits, l_ckpt)                      # the advantage head is not the LM's
    assert torch.allclose(out.value, torch.ones_like(out.value))       # v = 0 -> V = R_max
    if model.kind == "decoder-only":                                   # the fresh head is untied from the input
        assert model.theta.lm.get_output_embeddings().weight is not model.theta.lm.get_input_embeddings().weight
    model.save_theta(str(tmp_path / "theta"))
    loaded = QModel.create(checkpoint, parts=("theta",), theta_dir=str(tmp_path / "theta"))
    with torch.no_grad():
        again = loaded.theta_outputs(batch, loaded.encode(batch), None)
    assert torch.allclose(again.logits, out.logits, atol=1e-5) and not loaded.theta.uses_phi


def test_stage_holds_only_what_it_needs(checkpoint):
    model = QModel.create(checkpoint, parts=("phi",))
    assert model.ckpt is None and model.theta is None and model.phi is not None
    with pytest.raises(ValueError, match="θ_ckpt"):
        phi_loss(model, collate(_examples(), PAD), gamma=GAMMA)   # no cache and no θ_ckpt: says what is missing
    theta_only = QModel.create(checkpoint, parts=("theta",))
    n_theta = sum(p.numel() for p in theta_only.parameters())
    n_all = sum(p.numel() for p in QModel.create(checkpoint).parameters())
    assert n_theta < n_all


def test_fused_logit_statistics_match_plain_autograd():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, 11, (3, 5), generator=g)
    rows = torch.tensor([True, False, True])
    weights = torch.randn(3, 3, 5, generator=g, dtype=torch.float64)
    max_logit, taken, log_z = token_logit_stats(logits, actions, rows)
    (weights[0] * max_logit + weights[1] * taken + weights[2] * log_z).sum().backward()
    fused = logits.grad.clone()
    logits.grad = None
    ref_max = logits.max(-1).values
    ref_taken = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    ref_log_z = torch.logsumexp(logits, -1) * rows.unsqueeze(1)
    assert torch.allclose(max_logit, ref_max) and torch.allclose(taken, ref_taken)
    assert torch.allclose(log_z.double(), ref_log_z.detach(), atol=1e-6)
    (weights[0] * ref_max + weights[1] * ref_taken + weights[2] * ref_log_z).sum().backward()
    assert torch.allclose(fused, logits.grad, atol=1e-6)


@pytest.mark.parametrize("kind", ["decoder-only", "encoder-decoder"])
def test_bf16_autocast_keeps_a_q_and_v_in_float32(kind, tmp_path):
    """Under bf16 autocast the body runs in bf16 but the heads read off it (LM head, V heads) run in float32, so
    A_θ, Q_θ and V are float32 and, at initialisation, A_θ is within bf16's error of the hidden states alone of
    the float32 A_ckpt (the cached target), not within a bf16 rounding of the logits (about 0.04 per token)."""
    from learner_fixtures import example_rows, tiny_checkpoint

    from bcoder_ray.algorithms.bcoder.targets import frozen_target_tensors
    from bcoder_ray.model.batch import collate

    ckpt = tiny_checkpoint(kind, str(tmp_path / "ckpt"))
    model = QModel.create(ckpt, parts=("ckpt", "phi", "theta"))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 masters, whatever is stored
    batch = collate(example_rows(), 0)
    reference = frozen_target_tensors(model, batch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = model.encode(batch)
        out = model.theta_outputs(batch, encoded, model.phi_raw_values(batch, encoded))
        logits = model.theta.logits(model.theta.states(batch, encoded))
    assert out.advantage.dtype == out.q.dtype == out.value.dtype == logits.dtype == torch.float32
    mask = batch.program_mask.bool()
    err = (out.advantage - reference.a_ckpt)[mask].abs().max()
    # the states differ by bf16's relative resolution (2^-8) of their own size; the head sums d_model of them
    scale = float(logits.abs().max())
    assert err <= 4 * 2 ** -8 * scale
