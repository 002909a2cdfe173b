"""ReST-EM's M-step selection (the plug-in's buffer filters, `RestEM.m_step_rows`) and loss
(bcoder_ray.algorithms.rest_em.losses).

Tolerance ``MODEL``: the M-step's CE and the reference (theta_loss's L_ce, or a direct log_softmax on unpadded
rows) run the same tiny model (d_model 32, V = 48) through different batch shapes; they differ by the summation
order of float32 dot products and logsumexps (~1e-6 on values O(1-10)), so rtol = atol = 1e-5.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from bcoder_ray.algorithms.base import RunContext
from bcoder_ray.algorithms.rest_em.algorithm import RestEM, RestEMConfig
from bcoder_ray.algorithms.rest_em.losses import PASSED_REWARD, rest_em_loss
from bcoder_ray.buffer.schema import conform
from bcoder_ray.model.batch import collate
from bcoder_ray.buffer.synthetic import synthetic_rows
from bcoder_ray.algorithms.bcoder.losses import theta_loss
from bcoder_ray.algorithms.bcoder.q_model import QModel
from bcoder_ray.model.lm import DECODER_ONLY, PolicyLM, load_lm
from envs.result import Outcome
from learner_fixtures import KINDS, PAD, example_rows, tiny_checkpoint

torch.set_num_threads(1)
MODEL = dict(rtol=1e-5, atol=1e-5)
CTX = RunContext(theta_ckpt="unused", tokenizer_path="unused", source_len=16, target_len=16)  # nothing is loaded


def m_step_mask(table: pa.Table, iteration: int, *, include_human: bool = False,
                policy_version: str | None = None) -> pa.ChunkedArray:
    """Which rows of `table` the M-step of `iteration` reads: the plug-in's own filters (`RestEM.m_step_rows`, the
    rollout of iteration i samples with policy version str(i)) applied as the stage's buffer sampler applies them
    (`Filters.mask` on the rows as `schema.conform` reads them)."""
    algo = RestEM(RestEMConfig(include_human=include_human), CTX)
    rows = algo.m_step_rows(iteration, str(iteration) if policy_version is None else policy_version)
    assert rows.rho_real is None                                   # drawn uniformly, no human mixing ratio
    filters = rows.filters
    return filters.mask(conform(table, filters.columns()))


def select_m_step_rows(table: pa.Table, iteration: int, **kwargs) -> pa.Table:
    return table.filter(m_step_mask(table, iteration, **kwargs))


def _hand_table() -> pa.Table:
    rows = [  # (sample_id, source, iteration, outcome)
        ("g1-pass", "generated", 1, "passed"), ("g1-fail", "generated", 1, "failed"),
        ("g1-rt", "generated", 1, "runtime_error"), ("g1-ce", "generated", 1, "compile_error"),
        ("g0-pass", "generated", 0, "passed"), ("g2-pass", "generated", 2, "passed"),
        ("h-pass", "human", 0, "passed"), ("h-fail", "human", 0, "failed"), ("g1-pass-b", "generated", 1, "passed"),
    ]
    reward = {o.value: r for o, r in zip(Outcome, (1.0, -0.3, -0.6, -1.0))}
    return pa.table({"sample_id": [r[0] for r in rows], "source": [r[1] for r in rows],
                     "iteration": pa.array([r[2] for r in rows], pa.int32()), "outcome": [r[3] for r in rows],
                     "reward": [reward[r[3]] for r in rows],
                     "policy_version": [str(r[2]) if r[1] == "generated" else "human" for r in rows],
                     "decoding": ["sample"] * len(rows)})


def test_selection_keeps_only_passing_generated_rows_of_the_iteration():
    table = _hand_table()
    assert select_m_step_rows(table, 1)["sample_id"].to_pylist() == ["g1-pass", "g1-pass-b"]
    assert select_m_step_rows(table, 1, include_human=True)["sample_id"].to_pylist() == \
        ["g1-pass", "h-pass", "g1-pass-b"]                         # passing human rows only, any iteration
    assert select_m_step_rows(table, 2)["sample_id"].to_pylist() == ["g2-pass"]
    assert select_m_step_rows(table, 5).num_rows == 0


def test_selection_on_buffer_rows():
    rng = np.random.default_rng(0)
    parts = [synthetic_rows(rng, 200, iteration=it, start=1000 * it, mean_tokens=8, max_tokens=20)
             for it in range(3)]
    parts.append(synthetic_rows(rng, 50, source="human", mean_tokens=8, max_tokens=20))
    table = pa.concat_tables(parts)                                  # synthetic rows: policy version "v<iteration>"
    rows = table.select(["source", "iteration", "outcome", "reward"]).to_pylist()
    for include_human in (False, True):
        got = m_step_mask(table, 1, include_human=include_human, policy_version="v1").to_pylist()
        want = [r["outcome"] == "passed" and (r["source"] == "generated" and r["iteration"] == 1
                                              or include_human and r["source"] == "human") for r in rows]
        assert got == want and any(want)
    chosen = select_m_step_rows(table, 1, policy_version="v1")
    assert set(chosen["reward"].to_pylist()) == {PASSED_REWARD}


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


def _passing_rows(n: int = 4) -> list[dict]:
    return [dict(r, reward=PASSED_REWARD) for r in example_rows(n)]


def test_m_step_loss_is_the_project_ce(checkpoint):
    """rest_em_loss on θ_ckpt equals theta_loss's L_ce at initialisation (θ's LM = θ_ckpt), for both reductions."""
    rows = [dict(r, is_human=True) for r in _passing_rows()]
    batch = collate(rows, PAD)
    model = QModel.create(checkpoint)
    policy = PolicyLM(load_lm(checkpoint))
    for reduction in ("mean", "sum"):
        with torch.no_grad():
            loss, metrics = rest_em_loss(policy, batch, reduction=reduction)
            _, reference = theta_loss(model, batch, gamma=1.0, aux_reduction=reduction)
        torch.testing.assert_close(loss, torch.tensor(reference["l_ce"]), **MODEL)
        assert metrics["n_programs"] == 4 and metrics["n_tokens"] == float(batch.lengths.sum())


def test_m_step_loss_matches_log_softmax_and_trains(checkpoint):
    policy = PolicyLM(load_lm(checkpoint))
    policy.lm.requires_grad_(True)
    rows = _passing_rows()
    loss, _ = rest_em_loss(policy, collate(rows, PAD), reduction="mean")
    per_program = []
    with torch.no_grad():
        for row in rows:
            prompt, program = torch.tensor([row["prompt_ids"]]), torch.tensor([row["program_ids"]])
            if policy.kind == DECODER_ONLY:
                logits = policy.lm(input_ids=torch.cat([prompt, program[:, :-1]], 1)).logits[0, prompt.shape[1] - 1:]
            else:
                start = torch.tensor([[policy.lm.config.decoder_start_token_id]])
                logits = policy.lm(input_ids=prompt,
                                   decoder_input_ids=torch.cat([start, program[:, :-1]], 1)).logits[0]
            nll = -torch.log_softmax(logits.float(), -1).gather(-1, program[0].unsqueeze(-1))
            per_program.append(nll.mean())
    torch.testing.assert_close(loss.detach(), torch.stack(per_program).mean(), **MODEL)
    loss.backward()
    assert policy.lm.get_output_embeddings().weight.grad.abs().sum() > 0


def test_m_step_loss_refuses_failing_rows(checkpoint):
    policy = PolicyLM(load_lm(checkpoint))
    rows = _passing_rows()
    rows[2]["reward"] = -0.3
    with pytest.raises(ValueError, match="row 2 has reward -0.3"):
        rest_em_loss(policy, collate(rows, PAD))


def test_options():
    assert RestEMConfig().restart_from_ckpt and not RestEMConfig().include_human   # the paper's choices
    with pytest.raises(ValueError, match=r"RestEMConfig\nreduction\b"):
        RestEMConfig(reduction="max")
