"""Per-request sampling on the device: delay pattern, temperature, top-k, top-p, RAS, seed.

Every running request owns one row (its KV-cache slot) of the tensors in `SamplingRows`.
`sample` reads the audio head's logits for a batch of rows and updates those rows in
place with tensor operations only (no boolean indexing, no `.item()`, no host copy), so a
whole decode step, sampling included, can be captured as one CUDA graph.

It follows transformers' `generate` for Higgs Audio v2 step by step, so that greedy
decoding gives the same codes and sampling the same distribution:

1. the delay pattern (`HiggsAudioV2DelayPatternLogitsProcessor`): codebook i is forced to
   the stream BOS for its first i + 1 steps; once any codebook has emitted the stream EOS,
   codebook i is forced to EOS i + 1 steps later;
2. temperature, then top-k, then top-p, as `TemperatureLogitsWarper`, `TopKLogitsWarper`
   and `TopPLogitsWarper` do (greedy rows skip them and take the argmax);
3. repetition-aware sampling (RAS): a code that already appears `ras_win_max_num_repeat`
   times in the row's last `ras_win_len` steps is drawn again from the raw logits, as
   generate does (raw: without temperature or the delay-pattern masks).

Randomness is counter-based: the noise for (seed, step, codebook, code) is a hash of
those numbers, so a seeded request draws the same numbers alone or in any batch, on any
device, with no generator state to carry. A draw is Gumbel-max: argmax(scores + Gumbel
noise) is a sample from softmax(scores), the distribution generate's multinomial draws from.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from higgs_runpod.request.schema import RAS_WINDOW, SpeechRequest

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**31: products of 32-bit values stay inside int64, so nothing overflows
_SPREAD = 0x61C88647


def _request_default(name: str) -> Any:
    return SpeechRequest.model_fields[name].default


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings (the engine draws a seed where none is given); the
    defaults are a request's (schema.SpeechRequest)."""

    temperature: float = _request_default("temperature")
    top_p: float = _request_default("top_p")
    top_k: int = _request_default("top_k")  # 0: off
    seed: int | None = None
    max_new_tokens: int = _request_default("max_new_tokens")
    ras_win_len: int = _request_default("ras_win_len")  # 0: RAS off
    ras_win_max_num_repeat: int = _request_default("ras_win_max_num_repeat")


@dataclass(frozen=True)
class AudioVocab:
    """What sampling needs to know about the model's audio vocabulary."""

    num_codebooks: int
    codebook_size: int  # codes per codebook, stream BOS and EOS included
    stream_bos: int
    stream_eos: int
    audio_bos_token: int  # text-side ids that start and end the delay pattern
    audio_delay_token: int


@dataclass
class SamplingRows:
    """Sampling state of every slot: one row per slot, kept on the device."""

    seed: torch.Tensor  # (slots,) int64, below 2**32
    step: torch.Tensor  # (slots,) int64: steps generated so far
    max_steps: torch.Tensor  # (slots,) int64
    sampling: torch.Tensor  # (slots,) bool: False means greedy
    temperature: torch.Tensor  # (slots,) float32
    top_k: torch.Tensor  # (slots,) int64, codebook_size when off
    top_p: torch.Tensor  # (slots,) float32
    ras_len: torch.Tensor  # (slots,) int64, 0 when off
    ras_repeat: torch.Tensor  # (slots,) int64
    bos_countdown: torch.Tensor  # (slots, codebooks) int64: BOS forced while >= 0
    eos_countdown: torch.Tensor  # (slots, codebooks) int64: EOS forced once <= 0
    delayed: torch.Tensor  # (slots,) bool: an EOS was emitted, the EOS countdown runs
    history: torch.Tensor  # (slots, RAS_WINDOW, codebooks) int64: last steps, oldest
    # first, with -1 for the stream BOS and EOS (never counted as repetitions)

    @classmethod
    def allocate(cls, slots: int, vocab: AudioVocab, device: torch.device) -> SamplingRows:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        codebooks = vocab.num_codebooks
        return cls(
            seed=zeros(slots),
            step=zeros(slots),
            max_steps=zeros(slots),
            sampling=zeros(slots, dtype=torch.bool),
            temperature=zeros(slots, dtype=torch.float32) + 1.0,
            top_k=zeros(slots) + vocab.codebook_size,
            top_p=zeros(slots, dtype=torch.float32) + 1.0,
            ras_len=zeros(slots),
            ras_repeat=zeros(slots),
            bos_countdown=zeros(slots, codebooks),
            eos_countdown=zeros(slots, codebooks),
            delayed=zeros(slots, dtype=torch.bool),
            history=zeros(slots, RAS_WINDOW, codebooks) - 1,
        )

    def rows(self, start: int, stop: int) -> SamplingRows:
        """Views of rows [start, stop): updating them updates these tensors."""
        return SamplingRows(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def load(
        self,
        slot: int,
        settings: SamplingParams,
        vocab: AudioVocab,
        prompt_ids: torch.Tensor,
        prompt_audio: torch.Tensor | None,
    ) -> None:
        """Start `slot` for a new request whose prompt is `prompt_ids` (text ids, 1-D) with
        `prompt_audio` (delayed audio steps x codebooks) in it."""
        greedy = settings.temperature == 0.0
        top_k = settings.top_k if 0 < settings.top_k < vocab.codebook_size else 0
        values = {
            "seed": (settings.seed or 0) & _MASK32,
            "step": 0,
            "max_steps": settings.max_new_tokens,
            "sampling": not greedy,
            "temperature": 1.0 if greedy else settings.temperature,
            "top_k": top_k or vocab.codebook_size,
            "top_p": 1.0 if greedy else settings.top_p,
            "ras_len": min(settings.ras_win_len, self.history.shape[1]),
            "ras_repeat": settings.ras_win_max_num_repeat,
            "delayed": bool(prompt_ids[-1] == vocab.audio_delay_token),
        }
        for name, value in values.items():
            getattr(self, name)[slot] = value
        bos, eos = delay_countdowns(prompt_ids, vocab)
        self.bos_countdown[slot] = torch.tensor(bos)
        self.eos_countdown[slot] = torch.tensor(eos)
        history = self.history[slot]
        history.fill_(-1)
        if prompt_audio is not None and prompt_audio.shape[0]:
            tail = prompt_audio[-RAS_WINDOW:]
            special = (tail == vocab.stream_bos) | (tail == vocab.stream_eos)
            history[RAS_WINDOW - tail.shape[0] :] = tail.masked_fill(special, -1)


def delay_countdowns(prompt_ids: torch.Tensor, vocab: AudioVocab) -> tuple[list[int], list[int]]:
    """The delay-pattern countdowns at the first step, as the logits processor sets them
    from the prompt's last `codebooks` text ids."""
    codebooks = vocab.num_codebooks
    tail = prompt_ids[-codebooks:].tolist()
    pattern = list(range(1, codebooks + 1))

    def shifted(token: int, absent: list[int]) -> list[int]:
        if token not in tail:
            return absent
        after = codebooks - tail.index(token)
        return [p - after for p in pattern]

    return (
        shifted(vocab.audio_bos_token, [0] * codebooks),
        shifted(vocab.audio_delay_token, pattern),
    )


@dataclass(frozen=True)
class Features:
    """Which sampling features some running row uses, known on the host from the requests.

    The eager step skips what no row needs (as vLLM's sampler does for all-greedy batches);
    captured CUDA graphs always run with everything on, so one graph serves any mix.
    """

    sampling: bool = True
    top_k: bool = True
    top_p: bool = True
    ras: bool = True


ALL_FEATURES = Features()


def features_of(settings: list[SamplingParams], vocab: AudioVocab) -> Features:
    sampled = [s for s in settings if s.temperature > 0.0]
    return Features(
        sampling=bool(sampled),
        top_k=any(0 < s.top_k < vocab.codebook_size for s in sampled),
        top_p=any(s.top_p < 1.0 for s in sampled),
        ras=any(s.ras_win_len > 0 for s in settings),
    )


def sample(
    rows: SamplingRows, logits: torch.Tensor, vocab: AudioVocab, features: Features = ALL_FEATURES
) -> torch.Tensor:
    """One step for every row: logits (rows, codebooks * codebook_size) -> codes
    (rows, codebooks), with the rows' state advanced. Returns the codes and, as a last
    column, 1 where the row has finished (all codebooks at EOS, or max_new_tokens)."""
    batch, codebooks, size = logits.shape[0], vocab.num_codebooks, vocab.codebook_size
    raw = logits.float().reshape(batch, codebooks, size)
    const = _constants(vocab, raw.device)

    # 1. The delay pattern: the forced code of each codebook (BOS, EOS or none).
    bos_on = rows.bos_countdown >= 0
    eos_countdown = rows.eos_countdown - rows.delayed[:, None].long()
    forced = torch.where(
        bos_on, vocab.stream_bos, torch.where(eos_countdown <= 0, vocab.stream_eos, -1)
    )
    scores = raw.masked_fill(
        (forced[..., None] >= 0) & (forced[..., None] != const.codes), float("-inf")
    )

    # 2. Temperature, top-k, top-p; Gumbel noise makes the argmax a draw.
    chosen = scores.argmax(-1)
    noise = _gumbel(rows.seed, rows.step, const) if features.sampling or features.ras else None
    if features.sampling:
        assert noise is not None
        warped = _warp(scores / rows.temperature[:, None, None], rows, features)
        chosen = torch.where(rows.sampling[:, None], (warped + noise[0]).argmax(-1), chosen)

    # 3. RAS: a code repeated too often in the window is drawn again from the raw logits.
    history = rows.history
    if features.ras:
        assert noise is not None
        in_window = const.window_index >= (history.shape[1] - rows.ras_len)[:, None]
        repeats = ((history == chosen[:, None, :]) & in_window[..., None]).sum(1)
        redraw = (repeats >= rows.ras_repeat[:, None]) & (rows.ras_len > 0)[:, None]
        chosen = torch.where(redraw, (raw + noise[1]).argmax(-1), chosen)

    ended = chosen == vocab.stream_eos
    step = rows.step + 1
    finished = ended.all(-1) | (step >= rows.max_steps)
    # Commit the new state only now: an error above (out of memory) leaves the rows as they were.
    rows.bos_countdown.sub_(bos_on.long())
    rows.eos_countdown.copy_(eos_countdown)
    rows.delayed.logical_or_(ended.any(-1))
    # History keeps -1 for the stream BOS/EOS, which never count as repetitions.
    remembered = chosen.masked_fill((chosen == vocab.stream_bos) | ended, -1)
    rows.history.copy_(torch.cat([history[:, 1:], remembered[:, None, :]], dim=1))
    rows.step.copy_(step)
    return torch.cat([chosen, finished[:, None].long()], dim=1)


def _warp(scores: torch.Tensor, rows: SamplingRows, features: Features) -> torch.Tensor:
    """Top-k (ties with the k-th kept), then top-p (drop the least likely codes whose
    probabilities add up to at most 1 - top_p), per row, on one sort."""
    if not (features.top_k or features.top_p):
        return scores
    size = scores.shape[-1]
    ascending, order = scores.sort(dim=-1)
    if features.top_k:
        kth = ascending.gather(-1, (size - rows.top_k)[:, None, None].expand(*scores.shape[:2], 1))
        ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    if features.top_p:
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - rows.top_p)[:, None, None]
        drop[..., -1] = False  # the likeliest code always stays
        ascending = ascending.masked_fill(drop, float("-inf"))
    return scores.scatter(-1, order, ascending)


@dataclass(frozen=True)
class _Constants:
    codes: torch.Tensor  # arange(codebook_size)
    window_index: torch.Tensor  # arange(window)
    spread: torch.Tensor  # (2, codebooks, size): each noise element's own counter offset


_CONSTANTS: dict[tuple[AudioVocab, torch.device], _Constants] = {}


def _constants(vocab: AudioVocab, device: torch.device) -> _Constants:
    key = (vocab, device)
    if key not in _CONSTANTS:
        count = 2 * vocab.num_codebooks * vocab.codebook_size
        spread = torch.arange(count, device=device) * _SPREAD
        _CONSTANTS[key] = _Constants(
            codes=torch.arange(vocab.codebook_size, device=device),
            window_index=torch.arange(RAS_WINDOW, device=device),
            spread=spread.view(2, 1, vocab.num_codebooks, vocab.codebook_size),
        )
    return _CONSTANTS[key]


def _gumbel(seed: torch.Tensor, step: torch.Tensor, const: _Constants) -> torch.Tensor:
    """Two streams of Gumbel noise (2, rows, codebooks, size), the first for sampling and
    the second for RAS redraws, depending only on (seed, step, stream, index)."""
    counter = _hash32(_hash32(seed) ^ step)
    bits = _hash32(counter[:, None, None] + const.spread)
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return uniform.log_().neg_().log_().neg_()


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (multiply-xorshift) on int64 tensors, exact on every device."""
    x = x & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x
