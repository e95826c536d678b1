"""The device sampler's draws against generate's distribution on fixed logits.

generate turns a codebook's logits into a distribution with transformers' own warpers
(temperature, then top-k, then top-p), draws from it with `torch.multinomial`, and, with
RAS on, draws a repeated code again from the softmax of the raw logits. `sample` draws
with Gumbel noise hashed from (seed, step, code) instead; here 40,000 rows with distinct
seeds each draw once, and the counts must fit generate's probabilities: zero where
generate's are zero, and a chi-square statistic that a correct sampler exceeds with
probability below one in a million.
"""

from __future__ import annotations

import math

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from higgs_runpod.synthesis.sampler import AudioVocab, Features, SamplingRows, sample

DRAWS = 40_000
CODES = 24  # 22 codes, then the stream BOS and EOS
VOCAB = AudioVocab(num_codebooks=2, codebook_size=CODES, stream_bos=22, stream_eos=23,
                   audio_bos_token=1, audio_delay_token=2)  # fmt: skip


def fixed_logits() -> torch.Tensor:
    """(codebooks, codes): a spread of likelihoods, one codebook flatter than the other."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn((VOCAB.num_codebooks, CODES), generator=generator)
    return logits * torch.tensor([[1.0], [0.5]])


def rows_drawing(temperature: float, top_k: int, top_p: float, ras: int = 0) -> SamplingRows:
    """DRAWS rows at their first free step (no delay-pattern forcing), one seed each."""
    rows = SamplingRows.allocate(DRAWS, VOCAB, torch.device("cpu"))
    rows.seed.copy_(torch.arange(DRAWS) * 7919 + 3)
    rows.step.fill_(5)
    rows.max_steps.fill_(100)
    rows.sampling.fill_(True)
    rows.temperature.fill_(temperature)
    rows.top_k.fill_(top_k)
    rows.top_p.fill_(top_p)
    rows.ras_len.fill_(ras)
    rows.ras_repeat.fill_(2)
    rows.bos_countdown.fill_(-1)
    rows.eos_countdown.fill_(10**6)
    return rows


def generates_distribution(logits: torch.Tensor, temperature: float, top_k: int,
                           top_p: float) -> torch.Tensor:  # fmt: skip
    """What generate samples from: its warpers in its order, then softmax."""
    scores = logits.clone()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k),
                   TopPLogitsWarper(top_p)):  # fmt: skip
        scores = warper(torch.zeros((scores.shape[0], 1), dtype=torch.long), scores)
    return scores.softmax(-1)


def counts_of(rows: SamplingRows, logits: torch.Tensor) -> torch.Tensor:
    flat = logits.reshape(1, -1).expand(DRAWS, -1)
    codes = sample(rows, flat, VOCAB, Features())[:, :-1]
    return torch.stack([torch.bincount(codes[:, c], minlength=CODES) for c in range(2)])


def assert_fits(counts: torch.Tensor, expected: torch.Tensor) -> None:
    for codebook in range(VOCAB.num_codebooks):
        observed, probabilities = counts[codebook].double(), expected[codebook].double()
        possible = probabilities > 0
        assert observed[~possible].sum() == 0, f"codebook {codebook}: drew impossible codes"
        mean = probabilities[possible] * DRAWS
        chi_square = float(((observed[possible] - mean) ** 2 / mean).sum())
        dof = int(possible.sum()) - 1
        # Wilson-Hilferty: the chi-square quantile at 1 - 1e-6 (z = 4.75).
        limit = dof * (1 - 2 / (9 * dof) + 4.75 * math.sqrt(2 / (9 * dof))) ** 3
        assert chi_square < limit, (codebook, chi_square, limit, observed, mean)


def test_temperature_top_k_top_p_draws_follow_generates_warpers() -> None:
    logits = fixed_logits()
    expected = generates_distribution(logits, 0.8, 12, 0.9)
    assert ((expected > 0).sum(-1) > 4).all()  # the cut leaves something to compare
    assert_fits(counts_of(rows_drawing(0.8, 12, 0.9), logits), expected)


def test_ras_redraws_a_repeated_code_from_the_raw_logits() -> None:
    """The code generate's first draw would most often pick sits twice in the window, so
    when it is drawn it is drawn again from softmax(raw logits): P(c) = P1(c) for other
    codes, plus P1(repeated) * P_raw(c) for every code."""
    logits = fixed_logits()
    first = generates_distribution(logits, 0.8, CODES, 1.0)
    repeated = first.argmax(-1)
    rows = rows_drawing(0.8, CODES, 1.0, ras=7)
    rows.history[:, -3] = repeated
    rows.history[:, -1] = repeated
    raw = logits.softmax(-1)
    expected = first.clone()
    expected[torch.arange(2), repeated] = 0.0
    expected += first[torch.arange(2), repeated][:, None] * raw
    assert_fits(counts_of(rows, logits), expected)


def test_the_same_seed_and_step_draw_the_same_codes_in_any_row() -> None:
    logits = fixed_logits().reshape(1, -1).expand(64, -1)
    rows = rows_drawing(1.0, CODES, 1.0)
    rows.seed[:64] = 12345
    codes = sample(rows.rows(0, 64), logits, VOCAB, Features())
    assert (codes == codes[0]).all()
