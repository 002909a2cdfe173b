"""Q-sampling (Algorithm 2) and the free reward model (eq. 19-20)."""

from __future__ import annotations

import pytest
import torch

from bcoder_ray.algorithms.bcoder.q_model import QModel, capped_value
from bcoder_ray.algorithms.bcoder.ranking import rank, score_programs, token_scores
from bcoder_ray.model.sampling import sample_programs, warp_scores
from learner_fixtures import EOS, FAMILIES, PAD, perturb, tiny_checkpoint

torch.set_num_threads(1)
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
PROGRAMS = [[14, 15, 16, EOS], [17, EOS], [18, 19, 20, 21, 22], [EOS]]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def trained(checkpoint):
    model = QModel.create(checkpoint, parts=("phi", "theta"))
    perturb(model.freeze_for_stage("theta"), scale=0.5, seed=7)
    perturb(model.freeze_for_stage("phi"), scale=0.5, seed=8)
    model.freeze_for_stage("none")
    return model


def _generate(lm, prompts, n, *, max_new_tokens, temperature, top_p, seed):
    """Reference: transformers' generate on the checkpoint, left-padded prompts, the global RNG seeded."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=temperature > 0, temperature=temperature or None,
                      top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                      pad_token_id=PAD, eos_token_id=EOS)
    if not lm.config.is_encoder_decoder:
        out = out[:, width:]
    else:
        out = out[:, 1:]                      # drop the decoder start token
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row[:max_new_tokens])
    return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_q_sampling_at_init_draws_the_tokens_of_the_checkpoint(checkpoint, temperature, top_p):
    model = QModel.create(checkpoint, parts=("ckpt", "theta"))
    settings = dict(max_new_tokens=8, temperature=temperature, top_p=top_p, seed=123)
    n = 3 if temperature > 0 else 1          # generate refuses several greedy sequences
    mine = sample_programs(model.theta, PROMPTS, n, eos_id=EOS, pad_id=PAD, **settings)
    reference = _generate(model.ckpt.lm, PROMPTS, n, **settings)
    assert mine == reference
    assert mine == sample_programs(model.ckpt, PROMPTS, n, eos_id=EOS, pad_id=PAD, **settings)
    flat = [w for per_prompt in mine for w in per_prompt]
    assert all((w[-1] == EOS and EOS not in w[:-1]) or (len(w) == 8 and EOS not in w) for w in flat)
    if temperature == 1.0:
        assert len({tuple(w) for w in flat}) > 1


def test_q_sampling_is_seeded_and_batch_size_free_of_leaks(trained):
    kwargs = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=1.0, top_p=0.95)
    trained = trained.theta
    a = sample_programs(trained, PROMPTS, 4, seed=1, **kwargs)
    assert a == sample_programs(trained, PROMPTS, 4, seed=1, **kwargs)
    assert a != sample_programs(trained, PROMPTS, 4, seed=2, **kwargs)
    assert [len(x) for x in a] == [4, 4, 4]
    # greedy decoding does not depend on how rows are batched (padding and positions are right)
    greedy = dict(kwargs, temperature=0.0)
    assert sample_programs(trained, PROMPTS, 2, batch_size=1, **greedy) == \
        sample_programs(trained, PROMPTS, 2, batch_size=6, **greedy)


def test_top_p_keeps_the_smallest_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(warp_scores(scores, 1.0, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(warp_scores(scores, 1.0, 0.01)).sum() == 1
    assert torch.allclose(warp_scores(scores, 0.5, 1.0), scores / 0.5)


def _step_by_step(model: QModel, prompt, program):
    """Q_θ(s_t, a_t) and V_θ(s_t) from one unbatched, uncached HF forward per state (no QModel plumbing)."""
    theta_lm, phi_body = model.theta.lm, model.phi.body
    qs, vs = [], []
    p = torch.tensor([prompt])
    with torch.no_grad():
        for t in range(len(program)):
            prefix = torch.tensor([program[:t]], dtype=torch.long)
            if model.kind == "encoder-decoder":
                dec = torch.cat([torch.tensor([[model.decoder_start_id]]), prefix], 1)
                out = theta_lm(input_ids=p, decoder_input_ids=dec, output_hidden_states=True)
                hidden = out.decoder_hidden_states[-1][0, -1]
                enc = theta_lm.get_encoder()(input_ids=p).last_hidden_state
                h_phi = phi_body(input_ids=dec, encoder_hidden_states=enc).last_hidden_state[0, -1]
            else:
                ids = torch.cat([p, prefix], 1)
                out = theta_lm(input_ids=ids, output_hidden_states=True)
                hidden = out.hidden_states[-1][0, -1]
                h_phi = phi_body(input_ids=ids).last_hidden_state[0, -1]
            logits = out.logits[0, -1]
            raw = model.phi.v_head(h_phi) + model.theta.h1(hidden) - model.theta.h2(hidden)
            v = capped_value(raw, model.r_max).item()
            qs.append(model.alpha * (logits[program[t]] - logits.max()).item() + v)
            vs.append(v)
    return qs, vs


def test_ranking_pass_matches_step_by_step(trained):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(PROGRAMS))]
    scores = token_scores(trained, prompts, PROGRAMS, gamma=0.9, pad_id=PAD, batch_size=3)
    for prompt, program, s in zip(prompts, PROGRAMS, scores):
        q, v = _step_by_step(trained, prompt, program)
        assert s.q == pytest.approx(q, abs=1e-4) and s.value == pytest.approx(v, abs=1e-5)
        assert len(s.r_tilde) == len(program)


@pytest.mark.parametrize("gamma", [0.999, 0.9])
def test_rtilde_identity(trained, gamma):
    prompts = [PROMPTS[0]] * len(PROGRAMS)
    scores = token_scores(trained, prompts, PROGRAMS, gamma=gamma, pad_id=PAD)
    for s in scores:
        # r̃_t = Q(s_t, a_t) - γ V(s_{t+1}), V := 0 after the last token (eq. 20)
        expected = [s.q[t] - gamma * (s.value[t + 1] if t + 1 < len(s.q) else 0.0) for t in range(len(s.q))]
        assert s.r_tilde == pytest.approx(expected, abs=1e-5)
        identity = s.value[0] + sum(s.advantage) + (1 - gamma) * sum(s.value[1:])
        assert s.total == pytest.approx(identity, abs=1e-4)
    assert len({round(s.value[0], 6) for s in scores}) == 1          # candidates of a prompt share V(s_0)


def test_rank_orders_candidates_by_rtilde(trained):
    candidates = PROGRAMS + [PROGRAMS[1]]
    ranking = rank(trained, PROMPTS[1], candidates, gamma=0.999, pad_id=PAD, batch_size=2)
    assert sorted(ranking.order) == list(range(len(candidates)))
    ordered = [ranking.scores[i] for i in ranking.order]
    assert ordered == sorted(ordered, reverse=True)
    assert ranking.scores[1] == pytest.approx(ranking.scores[-1], abs=1e-5)   # same program, same score
    assert ranking.order.index(1) < ranking.order.index(len(candidates) - 1)  # ties keep candidate order
    assert ranking.scores == pytest.approx(
        score_programs(trained, [PROMPTS[1]] * len(candidates), candidates, gamma=0.999, pad_id=PAD), abs=1e-5)
    with pytest.raises(ValueError, match="no candidates"):
        rank(trained, PROMPTS[1], [], gamma=0.999, pad_id=PAD)
