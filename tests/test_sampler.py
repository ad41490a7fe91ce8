"""The sampler: greedy, temperature, top-k / top-p / min-p, penalties, grammar bitmask, seeds,
logprobs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from edgelm.layers.sampler import Sampler, apply_bitmask, bits_to_uniform, seeded_uniform
from edgelm.sampling.sampling_batch_info import Penalizer, SamplingBatchInfo
from edgelm.sampling.sampling_params import SamplingParams

V = 8
PROBS = torch.tensor([0.05, 0.5, 0.01, 0.3, 0.02, 0.08, 0.03, 0.01])  # sums to 1; order 1 > 3 > 5 > 0 ...
LOGITS = PROBS.log()


def _req(seed=0, output_ids=(), prompt_ids=(), logprob=False, top=0, **params):
    sp = SamplingParams(**params)
    penal = any(params.get(k, d) != d for k, d in (("repetition_penalty", 1.0), ("frequency_penalty", 0.0),
                                                    ("presence_penalty", 0.0)))
    return SimpleNamespace(sampling_params=sp, seed=seed, output_ids=list(output_ids), return_logprob=logprob,
                           top_logprobs_num=top,
                           penalizer=Penalizer(list(prompt_ids), list(output_ids), V, "cpu") if penal else None)


def _sample(reqs, logits=None):
    logits = (LOGITS if logits is None else logits).expand(len(reqs), -1).clone()
    return Sampler()(logits, SamplingBatchInfo.from_reqs(reqs, V, "cpu"))


def _frequencies(n=4000, **params):
    """Token frequencies over n requests with seeds 0..n-1 (one batch: rows draw independently)."""
    reqs = [_req(seed=s, **params) for s in range(n)]
    ids = _sample(reqs).next_token_ids
    return torch.bincount(ids, minlength=V).float() / n


def test_greedy():
    out = _sample([_req(temperature=0.0), _req(top_k=1, temperature=0.7)])
    assert out.next_token_ids.tolist() == [1, 1]
    info = SamplingBatchInfo.from_reqs([_req(temperature=0.0)], V, "cpu")
    assert info.is_all_greedy and not info.need_top_p_top_k
    assert info.temperatures is None and info.seeds is None  # nothing built that argmax does not read
    assert SamplingBatchInfo.from_reqs([_req(temperature=0.0), _req(temperature=0.7)], V, "cpu").temperatures.shape == (2, 1)


def test_mixed_greedy_and_sampled_rows():
    reqs = [_req(temperature=0.0) if i % 2 == 0 else _req(seed=i, temperature=1.0) for i in range(400)]
    ids = _sample(reqs).next_token_ids
    assert (ids[0::2] == 1).all()
    assert len(set(ids[1::2].tolist())) > 2


def test_temperature_one_draws_from_softmax():
    freq = _frequencies(temperature=1.0)
    assert (freq - PROBS).abs().max() < 0.03


def test_temperature_sharpens_and_flattens():
    cold, hot = _frequencies(temperature=0.3), _frequencies(temperature=3.0)
    expect_cold = torch.softmax(LOGITS / 0.3, -1)
    expect_hot = torch.softmax(LOGITS / 3.0, -1)
    assert (cold - expect_cold).abs().max() < 0.03
    assert (hot - expect_hot).abs().max() < 0.03


def test_top_k():
    freq = _frequencies(top_k=2)
    assert set(freq.nonzero().flatten().tolist()) == {1, 3}
    assert abs(freq[1] - 0.5 / 0.8) < 0.03


def test_top_p():
    # sorted: 0.5, 0.3, 0.08, 0.05...: the mass before token 5 is 0.8 > 0.7, so only 1 and 3 stay
    freq = _frequencies(top_p=0.7)
    assert set(freq.nonzero().flatten().tolist()) == {1, 3}
    assert abs(freq[1] - 0.625) < 0.03
    # the top token always stays
    assert set(_frequencies(n=200, top_p=0.01).nonzero().flatten().tolist()) == {1}


def test_min_p():
    freq = _frequencies(min_p=0.15)  # threshold 0.075 keeps 0.5, 0.3, 0.08
    assert set(freq.nonzero().flatten().tolist()) == {1, 3, 5}
    assert abs(freq[5] - 0.08 / 0.88) < 0.03


def test_rows_keep_their_own_parameters():
    reqs = [_req(seed=s, top_k=1 + (s % 2), temperature=1.0) for s in range(600)]
    ids = _sample(reqs).next_token_ids
    assert (ids[0::2] == 1).all()  # top_k=1
    assert set(ids[1::2].tolist()) == {1, 3}  # top_k=2


def test_same_seed_same_tokens_whatever_the_batch():
    alone = _sample([_req(seed=1234, output_ids=[0] * 5)]).next_token_ids
    in_batch = _sample([_req(seed=7), _req(seed=1234, output_ids=[0] * 5), _req(seed=9)]).next_token_ids
    assert in_batch[1] == alone[0]
    # a whole sequence of steps: same seed → same draws; another seed → other draws
    flat = torch.zeros(V)  # uniform: every draw is decided by the noise

    def draws(seed):
        return [int(_sample([_req(seed=seed, output_ids=[0] * step)], flat).next_token_ids) for step in range(24)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)


def test_seeded_uniform_range_and_independence():
    u = seeded_uniform(torch.arange(64), torch.zeros(64, dtype=torch.int64), 1000)
    assert u.shape == (64, 1000) and (u > 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1])
    big = seeded_uniform(torch.tensor([2**62 + 5]), torch.tensor([3]), 16)
    assert torch.equal(big, seeded_uniform(torch.tensor([2**62 + 5]), torch.tensor([3]), 16))


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5, 0, 0, 0, 0]])
    req = _req(prompt_ids=[0], output_ids=[1], repetition_penalty=2.0, temperature=0.0)
    info = SamplingBatchInfo.from_reqs([req], V, "cpu")
    Sampler._apply_penalties(logits, info)
    assert logits[0, :4].tolist() == [1.0, -2.0, 1.0, 0.5]  # tokens 0 (prompt) and 1 (output) seen
    # a strong penalty moves greedy off a repeated token
    out = _sample([_req(prompt_ids=[1], repetition_penalty=2.0, temperature=0.0)],
                  torch.tensor([0.0, 2.0, 0.0, 1.5, 0, 0, 0, 0]))
    assert int(out.next_token_ids) == 3


def test_frequency_and_presence_penalties_count_output_only():
    logits = torch.zeros(1, V)
    req = _req(prompt_ids=[5], output_ids=[2, 2, 2, 4], frequency_penalty=0.5, presence_penalty=0.25)
    Sampler._apply_penalties(logits, SamplingBatchInfo.from_reqs([req], V, "cpu"))
    expect = torch.zeros(V)
    expect[2] = -(3 * 0.5 + 0.25)
    expect[4] = -(0.5 + 0.25)
    torch.testing.assert_close(logits[0], expect)
    # unpenalized rows in the same batch are untouched
    logits = torch.zeros(2, V)
    info = SamplingBatchInfo.from_reqs([req, _req()], V, "cpu")
    Sampler._apply_penalties(logits, info)
    assert (logits[1] == 0).all()


def test_bitmask_limits_tokens():
    logits = LOGITS.expand(2, -1).clone()
    mask = torch.tensor([[0b0010_0100], [-1]], dtype=torch.int32)  # row 0: tokens 2 and 5 only
    apply_bitmask(logits, mask)
    assert torch.isinf(logits[0]).sum() == V - 2 and torch.isfinite(logits[0, [2, 5]]).all()
    assert torch.isfinite(logits[1]).all()
    info = SamplingBatchInfo.from_reqs([_req(temperature=0.0)], V, "cpu")
    info.vocab_mask = mask[:1]
    assert int(Sampler()(LOGITS[None].clone(), info).next_token_ids) == 5  # the best allowed token


def test_uniform_never_reaches_one():
    """A uniform of exactly 1.0 gives the exponential race a noise of 0: a masked (zero-probability)
    token then scores 0 / 0 = NaN and wins the argmax. It happened to ~0.3% of sampled steps with a
    49k vocabulary (found as a grammar-rejected token in the test suite)."""
    extremes = bits_to_uniform(torch.tensor([0, 0xFFFFFFFF, 0xFFFFFF00, 0x80000000], dtype=torch.int64))
    assert (extremes > 0).all() and (extremes < 1).all()
    assert (-torch.log(extremes) > 0).all()


@pytest.mark.parametrize("greedy", [True, False])
def test_logprobs_and_top_logprobs(greedy):
    params = {"temperature": 0.0} if greedy else {"temperature": 0.8}
    reqs = [_req(seed=3, logprob=True, top=3, **params), _req(seed=4, logprob=True, top=1, **params)]
    out = _sample(reqs)
    expect = torch.log_softmax(LOGITS, -1)
    assert out.logprobs.shape == (2,) and out.top_logprobs.shape == out.top_ids.shape == (2, 3)
    torch.testing.assert_close(out.logprobs, expect[out.next_token_ids])
    assert out.top_ids[0].tolist() == [1, 3, 5]
    torch.testing.assert_close(out.top_logprobs[0], expect[[1, 3, 5]])
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_no_logprobs_unless_asked():
    out = _sample([_req(temperature=0.0)])
    assert out.logprobs is None and out.top_logprobs is None and out.top_ids is None


def test_sampling_params_verify():
    SamplingParams().verify(V)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": 0}, {"min_p": 2}, {"repetition_penalty": 0},
                {"frequency_penalty": 3}, {"stop_token_ids": [V]}, {"n": 0}, {"json_schema": "{}", "regex": "a"}):
        with pytest.raises(ValueError):
            SamplingParams(**bad).verify(V)
