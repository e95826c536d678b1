"""Encoding audio as it is generated: one incremental encoder per response.

    float pieces --tempo.Stretcher (speed)--> --resampler (sample_rate)--> 16-bit PCM
        --codec (PyAV)--> packets --muxer--> bytes of the file, only the new ones each time

Every format goes through the same `ProgressiveEncoder`, streamed or not: a streamed
response feeds it piece by piece and sends what each `feed` returns; a non-streamed one
feeds it everything at once (`encode`). Nothing in the chain depends on how the input was
cut (FFmpeg's resampler and atempo keep their state, the codec re-chunks into its own
frame size), so the joined pieces are the non-streamed file. The muxer writes to a sink
that cannot seek, as a socket cannot: every byte handed out is final, and any prefix
ending at a piece is a playable file. The one exception is the length fields of `wav`
and `flac` headers, which a whole file fills in (FFmpeg seeks back to write them) and a
stream leaves open, as streaming players expect.
"""

from __future__ import annotations

import io

import av
import numpy as np

from higgs_runpod.errors import RequestError
from higgs_runpod.synthesis.tempo import Stretcher

# format -> (container, codec, content type)
_FORMATS: dict[str, tuple[str, str, str]] = {
    "wav": ("wav", "pcm_s16le", "audio/wav"),
    "flac": ("flac", "flac", "audio/flac"),
    "mp3": ("mp3", "libmp3lame", "audio/mpeg"),
    "opus": ("ogg", "libopus", "audio/ogg"),
    "aac": ("adts", "aac", "audio/aac"),
}
CONTENT_TYPES = {name: spec[2] for name, spec in _FORMATS.items()} | {"pcm": "audio/L16"}
_BITRATES = {"mp3": 128_000, "opus": 64_000, "aac": 128_000}
# bitexact: no encoder tags and a fixed Ogg serial, so two encodes of the same audio are
# the same bytes. Ogg pages close after 40 ms of audio (one model frame), not FFmpeg's 1 s.
_CONTAINER_OPTIONS = {"fflags": "+bitexact"}
_OGG_OPTIONS = {**_CONTAINER_OPTIONS, "page_duration": "40000"}
_LENGTHS_IN_HEADER = {"wav", "flac"}
# Formats with no file for zero samples: an mp3 or ADTS stream is only its frames, and
# FFmpeg cannot open an Ogg stream without an audio page.
_NOT_EMPTY = {"mp3", "opus", "aac"}


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")


class _Sink:
    """Where the muxer writes: collects bytes until taken; cannot seek, like a socket."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


class ProgressiveEncoder:
    """float32 mono pieces at `source_rate` in, bytes of `audio_format` out.

    `feed` returns only the bytes that are new since the last call (possibly none: a
    codec holds back up to a frame); `finish` flushes every stage, ends the file and
    returns its last bytes. `whole=True` is for a complete clip fed at once: nothing
    comes out before `finish`, and `wav`/`flac` headers get their real lengths.
    """

    def __init__(
        self,
        audio_format: str,
        source_rate: int,
        sample_rate: int,
        speed: float = 1.0,
        whole: bool = False,
    ) -> None:
        self.format = audio_format
        self.source_rate = source_rate
        self.sample_rate = sample_rate
        self.samples_out = 0  # at sample_rate, after speed: the duration so far
        self.finished = False
        self.audio_out = False  # whether any encoded audio has been written yet
        self.stretcher = Stretcher(source_rate, speed) if speed != 1.0 else None
        self.resampler = (
            av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            if sample_rate != source_rate
            else None
        )
        self.container: av.container.OutputContainer | None = None
        if audio_format == "pcm":
            return
        container_format, codec, _ = _FORMATS[audio_format]
        self.whole_file = io.BytesIO() if whole and audio_format in _LENGTHS_IN_HEADER else None
        self.sink = _Sink()
        options = _OGG_OPTIONS if container_format == "ogg" else _CONTAINER_OPTIONS
        self.container = av.open(
            self.whole_file or self.sink, mode="w", format=container_format,
            container_options=options,
        )  # fmt: skip
        stream = self.container.add_stream(codec, rate=sample_rate, layout="mono")
        assert isinstance(stream, av.AudioStream)
        self.stream = stream
        if audio_format in _BITRATES:
            self.stream.bit_rate = _BITRATES[audio_format]
        self.container.start_encoding()  # the header goes out with the first bytes

    def feed(self, samples: np.ndarray) -> bytes:
        """Encode one more piece; return the new bytes."""
        if self.finished:
            raise RuntimeError("the encoder has finished")
        if self.stretcher is not None:
            samples = self.stretcher.push(samples)
        return self._encode(self._resample(samples, final=False), final=False)

    def finish(self) -> bytes:
        """Flush the filters and the codec, close the file; return its last bytes.

        No audio at all (the model made no complete frame) gives an empty file: a wav or
        flac header, or no bytes of pcm; formats that cannot be empty raise `RequestError`.
        """
        if self.finished:
            return b""
        samples = self.stretcher.flush() if self.stretcher is not None else _EMPTY
        data = self._encode(self._resample(samples, final=True), final=True)
        self.finished = True
        if self.samples_out == 0 and self.format in _NOT_EMPTY:
            raise RequestError(
                "format",
                f"the model made no audio (0 frames), and {self.format} cannot hold none: "
                "raise max_new_tokens, or ask for wav, flac or pcm",
            )
        return data

    def _resample(self, samples: np.ndarray, final: bool) -> np.ndarray:
        if self.resampler is None:
            return samples
        frames = []
        if len(samples):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1),
                format="flt",
                layout="mono",
            )
            frame.sample_rate = self.source_rate
            frames += self.resampler.resample(frame)
        if final:
            frames += self.resampler.resample(None)
        if not frames:
            return _EMPTY
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])

    def _encode(self, samples: np.ndarray, final: bool) -> bytes:
        pcm = to_pcm16(samples)
        if self.container is None:
            self.samples_out += len(pcm)
            return pcm.tobytes()
        packets: list[av.Packet] = []
        if len(pcm):
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self.samples_out
            packets += self.stream.encode(frame)
            self.samples_out += len(pcm)
        if final:
            packets += self.stream.encode(None)
        self.container.mux(packets)
        self.audio_out = self.audio_out or bool(packets)
        if final:
            self.container.close()
            if self.whole_file is not None:
                return self.whole_file.getvalue()
        # A header without audio is not yet a playable file: it waits for the first packet
        # (or the end of a file with no audio).
        return self.sink.take() if self.audio_out or final else b""


_EMPTY = np.zeros(0, dtype=np.float32)


def encode(
    samples: np.ndarray,
    sample_rate: int,
    audio_format: str,
    source_rate: int | None = None,
    speed: float = 1.0,
) -> bytes:
    """A whole clip (float32 mono at `source_rate`, default `sample_rate`) as one file."""
    encoder = ProgressiveEncoder(
        audio_format, source_rate or sample_rate, sample_rate, speed, whole=True
    )
    return encoder.feed(samples) + encoder.finish()
