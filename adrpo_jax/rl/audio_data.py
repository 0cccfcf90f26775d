"""Audio prompts for GRPO / ADRPO on audio LLMs: built-in offline tasks, an AVQA / MMAU-style jsonl source,
log-mel features and the rewards of multiple-choice audio QA.

Sources follow :class:`adrpo_jax.rl.data.PromptSource` (``source[i] -> dict``); every row has ``"audio"`` (a
16 kHz mono WAV path), ``"prompt"`` (the text that follows the audio in the model's input) and ``"answer"``:

* :class:`SpokenArithmeticTask`: "what is seven plus two" spoken by ``espeak-ng`` (resampled to 16 kHz mono
  by ``sox``, no dither: byte-identical clips on every run), answer ``"9"``. A pure function of
  ``(seed, index)``; each distinct question is synthesized once (~12 ms) and cached as a WAV under
  ``$ADRPO_JAX_CACHE/audio/spoken_arith-<hash>/`` (else ``~/.cache/adrpo_jax/...``).
* :class:`BeepCountTask`: the numpy-only fallback for machines without those binaries: ``n`` tone bursts in
  noise ("how many beeps?"), answer ``str(n)``; also a pure function of ``(seed, index)``, cached the same way.
  :func:`make_audio_task` with ``kind='auto'`` picks the spoken task when ``espeak-ng`` and ``sox`` are on
  ``PATH`` and the fallback otherwise (with a logged note).
* :class:`AudioChoiceJsonlSource`: a jsonl of ``{"audio": path, "question": str, "choices": [str, ...],
  "answer": str}`` (AVQA / MMAU multiple choice; ``answer`` is the correct option's text, its letter or its
  0-based index; relative audio paths are relative to the jsonl's directory). Rows carry ``choices`` (list),
  ``answer`` (the correct option's text), ``answer_letter``, the rendered multiple-choice ``prompt`` and the
  file's other scalar fields (MMAU's ``task``: sound / music / speech). Every audio header is checked at load;
  bad rows raise together (file and line) or are skipped and counted (``on_bad_row='skip'``).
  :func:`convert_mmau` (MMAU's JSON array) and :func:`convert_avqa` (AVQA's ``multi_choice`` annotations) write
  it from the datasets' own files; also ``python -m adrpo_jax.rl.audio_data mmau|avqa SRC OUT ...``.

Features: :func:`read_wav` (PCM 8/16/24/32-bit, float, WAVE_FORMAT_EXTENSIBLE; polyphase anti-aliased
resampling to 16 kHz) and :class:`LogMelFeatures` (transformers' ``WhisperFeatureExtractor``, built from
constructor arguments: no files, no network) give ``input_features [B, n_mels, F]`` float32 and
``feature_attention_mask [B, F]`` int32 (``F = 100 * seconds``, or per batch for the Omni encoder).

Rewards (registered on import; also usable by path, ``'adrpo_jax.rl.audio_data:choice_accuracy_reward'``):
``choice_accuracy`` (the letter of the one ``<answer>`` block first, then the option text: see
:func:`parse_choice`; no answer block, several blocks or a hedge score 0), ``choice_accuracy_untagged`` (tag-free
prompts), ``mmau_accuracy`` (MMAU's option-text scorer :func:`mmau_string_match` on the answer, with
:data:`TEXT_CHOICE_TEMPLATE`) and ``answer_format`` (1 for ``[<think>...</think>] <answer>...</answer>``).
:func:`accuracy_by_category` gives MMAU's per-category (sound / music / speech) accuracies.

>>> choice_accuracy_reward(["q"] * 3, ["<answer>(B)</answer>", "a dog barking", "<answer>C</answer>"],
...                        choices=[["a cat", "a dog barking", "rain"]] * 3, answer=["a dog barking"] * 3)
[1.0, 0.0, 0.0]
>>> number_to_words(17), number_to_words(42)
('seventeen', 'forty two')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adrpo_jax.cache import cache_root
from adrpo_jax.rl.rewards import register_reward_function

__all__ = [
    "SAMPLE_RATE",
    "TEXT_CHOICE_TEMPLATE",
    "AudioChoiceJsonlSource",
    "BeepCountTask",
    "LogMelFeatures",
    "SpokenArithmeticTask",
    "WavInfo",
    "accuracy_by_category",
    "answer_format_reward",
    "answer_text",
    "check_audio_data",
    "choice_accuracy_reward",
    "choice_accuracy_untagged_reward",
    "convert_avqa",
    "convert_mmau",
    "format_choices_prompt",
    "make_audio_task",
    "mmau_accuracy_reward",
    "mmau_string_match",
    "number_to_words",
    "parse_choice",
    "read_wav",
    "resample",
    "spoken_task_available",
    "wav_info",
    "write_wav",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
_INFINITE = 2**40

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def number_to_words(n: int) -> str:
    """English words of ``0 <= n < 1000`` (``'forty two'``, ``'one hundred and five'``)."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_to_words supports 0 <= n < 1000, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " and " + number_to_words(rest))


# ----------------------------------------------------------------------------------------------------------
# WAV I/O
# ----------------------------------------------------------------------------------------------------------

_WAVE_FORMAT_PCM, _WAVE_FORMAT_IEEE_FLOAT, _WAVE_FORMAT_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_FORMAT_NAMES = {0x0002: "MS ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM", 0x0055: "MP3"}
_CONVERT_HINT = "convert it with: ffmpeg -i IN -ac 1 -ar 16000 -c:a pcm_s16le OUT.wav"


@dataclasses.dataclass(frozen=True)
class WavInfo:
    """What a WAV header says (:func:`wav_info`): ``encoding`` is ``'pcm'`` (integer samples of ``bits`` =
    8 (unsigned), 16, 24 or 32) or ``'float'`` (``bits`` = 32 or 64); ``frames`` samples per channel stored at
    ``data_offset`` (``data_bytes = frames * channels * bits // 8``)."""

    path: str
    sample_rate: int
    channels: int
    bits: int
    encoding: str
    frames: int
    data_offset: int
    data_bytes: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def wav_info(path: str | os.PathLike) -> WavInfo:
    """Parses the RIFF header of a WAV file without reading its samples (cheap: the load-time check).

    Supported: ``WAVE_FORMAT_PCM`` (8-bit unsigned, 16/24/32-bit signed), ``WAVE_FORMAT_IEEE_FLOAT`` (32/64-bit)
    and ``WAVE_FORMAT_EXTENSIBLE`` with a PCM or float sub-format (what ffmpeg writes for > 2 channels or
    > 16 bits). A ``data`` size of 0xFFFFFFFF (a header written to a pipe) means "to the end of the file".

    Raises ``ValueError`` naming the file for anything else: not RIFF/WAVE, another codec (ADPCM, mu-law, MP3 in
    WAV, ...), a bad ``fmt`` chunk, no ``data`` chunk, a file shorter than its ``data`` chunk (truncated) or no
    audio frames at all.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
                raise ValueError(f"{path}: not a WAV file (no RIFF/WAVE header); {_CONVERT_HINT}")
            if head[:4] == b"RIFX":
                raise ValueError(f"{path}: big-endian RIFX WAV is not supported; {_CONVERT_HINT}")
            fmt = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    raise ValueError(f"{path}: no 'data' chunk (truncated or not a WAV file)")
                cid, csize = chunk[:4], int.from_bytes(chunk[4:], "little")
                if cid == b"fmt ":
                    body = f.read(csize)
                    if len(body) < 16 or len(body) < csize:
                        raise ValueError(f"{path}: 'fmt ' chunk of {len(body)} bytes is truncated")
                    fmt = body
                    if csize % 2:
                        f.seek(1, os.SEEK_CUR)
                elif cid == b"data":
                    if fmt is None:
                        raise ValueError(f"{path}: 'data' chunk before the 'fmt ' chunk")
                    offset = f.tell()
                    break
                else:
                    f.seek(csize + (csize % 2), os.SEEK_CUR)
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or err})") from None
    tag, channels, rate = (int.from_bytes(fmt[a:b], "little") for a, b in ((0, 2), (2, 4), (4, 8)))
    block_align, bits = int.from_bytes(fmt[12:14], "little"), int.from_bytes(fmt[14:16], "little")
    if tag == _WAVE_FORMAT_EXTENSIBLE:
        if len(fmt) < 40:
            raise ValueError(f"{path}: WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk of {len(fmt)} bytes (need 40)")
        tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID starts with the format code
    if tag == _WAVE_FORMAT_PCM:
        encoding = "pcm"
        if bits not in (8, 16, 24, 32):
            raise ValueError(f"{path}: {bits}-bit PCM is not supported (8, 16, 24, 32); {_CONVERT_HINT}")
    elif tag == _WAVE_FORMAT_IEEE_FLOAT:
        encoding = "float"
        if bits not in (32, 64):
            raise ValueError(f"{path}: {bits}-bit float is not supported (32, 64); {_CONVERT_HINT}")
    else:
        name = _FORMAT_NAMES.get(tag, f"format code {tag:#06x}")
        raise ValueError(f"{path}: {name} WAV is not supported (PCM or IEEE float only); {_CONVERT_HINT}")
    if channels < 1 or rate < 1 or block_align != channels * bits // 8:
        raise ValueError(f"{path}: inconsistent 'fmt ' chunk (channels {channels}, rate {rate}, bits {bits}, "
                         f"block_align {block_align})")
    declared = int.from_bytes(chunk[4:], "little")
    available = size - offset
    if declared == 0xFFFFFFFF:
        declared = available - available % block_align
    if declared > available:
        raise ValueError(f"{path}: truncated: the 'data' chunk declares {declared} bytes but the file holds "
                         f"{available} after the header")
    if declared % block_align:
        raise ValueError(f"{path}: 'data' chunk of {declared} bytes is not a whole number of {block_align}-byte "
                         "frames")
    frames = declared // block_align
    if frames == 0:
        raise ValueError(f"{path}: holds no audio frames")
    return WavInfo(path, rate, channels, bits, encoding, frames, offset, declared)


def _decode_samples(raw: bytes, info: WavInfo) -> np.ndarray:
    if info.encoding == "float":
        return np.frombuffer(raw, "<f4" if info.bits == 32 else "<f8").astype(np.float32)
    if info.bits == 8:
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if info.bits == 16:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if info.bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    return (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``x`` at ``rate`` Hz -> ``target`` Hz by polyphase filtering (``scipy.signal.resample_poly``, up / down
    from the gcd of the rates, its default Kaiser-windowed anti-aliasing low-pass at the lower Nyquist), so
    content above ``target / 2`` is removed instead of folded into the band (what linear interpolation does).
    Output length ``ceil(len(x) * target / rate)``."""
    if rate == target or len(x) == 0:
        return np.asarray(x, np.float32)
    from scipy.signal import resample_poly  # pylint: disable=import-outside-toplevel
    g = math.gcd(int(rate), int(target))
    return resample_poly(np.asarray(x, np.float64), int(target) // g, int(rate) // g).astype(np.float32)


def read_wav(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples of a WAV file at ``sample_rate`` Hz.

    Formats: see :func:`wav_info` (PCM 8/16/24/32-bit, IEEE float 32/64-bit, WAVE_FORMAT_EXTENSIBLE); integer
    samples are scaled to ``[-1, 1)``, float samples kept as they are; channels are averaged; another rate is
    resampled with an anti-aliasing polyphase filter (:func:`resample`). Raises ``ValueError`` naming the file
    for an unsupported, corrupt or truncated file.
    """
    info = wav_info(path)
    with open(info.path, "rb") as f:
        f.seek(info.data_offset)
        raw = f.read(info.data_bytes)
    if len(raw) != info.data_bytes:
        raise ValueError(f"{info.path}: truncated while reading ({len(raw)} of {info.data_bytes} bytes)")
    x = _decode_samples(raw, info)
    x = x.reshape(-1, info.channels).mean(axis=1) if info.channels > 1 else x
    return np.ascontiguousarray(resample(x, info.sample_rate, sample_rate), np.float32)


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Writes mono float samples (clipped to ``[-1, 1]``) as 16-bit PCM, atomically (temp file + rename)."""
    pcm = (np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".wav.tmp")
    os.close(fd)
    with wave.open(tmp, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------
# Built-in tasks
# ----------------------------------------------------------------------------------------------------------


def spoken_task_available() -> bool:
    """``espeak-ng`` and ``sox`` are on ``PATH`` (the spoken task can be synthesized)."""
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def _synthesize(text: str, out: Path, voice: str, speed: int) -> None:
    """``espeak-ng`` -> 16 kHz mono 16-bit WAV via ``sox -D`` (no dither: deterministic bytes); atomic."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".wav")
    os.close(fd)
    try:
        speech = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], check=True,
                                capture_output=True, timeout=60).stdout
        subprocess.run(["sox", "-D", "-t", "wav", "-", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", tmp],
                       input=speech, check=True, capture_output=True, timeout=60)
        os.replace(tmp, out)
    except (subprocess.CalledProcessError, OSError) as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        detail = getattr(err, "stderr", b"") or b""
        raise RuntimeError(f"synthesizing {text!r} failed: {err} {detail.decode(errors='replace')[:300]}") from None


@dataclasses.dataclass
class SpokenArithmeticTask:
    """Spoken arithmetic: rows ``{"audio": wav path, "prompt", "answer", "transcript", "index"}``.

    Operands are drawn uniformly from ``[min_value, max_value]`` by ``np.random.default_rng([seed, index])``;
    subtraction keeps ``a >= b`` (answers are never negative). The question text is
    ``"what is {a} {op} {b}"`` in words; ``prompt`` is the text the model sees after the audio.

    Args:
      min_value, max_value: operand range (``0 <= min_value <= max_value <= 99``).
      operations: any of ``'+'``, ``'-'``, ``'*'``.
      seed: the problem stream.
      voice, speed: ``espeak-ng`` voice and words per minute.
      prompt: the text prompt of every row.
      cache_dir: where the clips go (default ``cache_root() / 'audio'``).
    """

    min_value: int = 0
    max_value: int = 9
    operations: tuple[str, ...] = ("+",)
    seed: int = 0
    voice: str = "en-us"
    speed: int = 165
    prompt: str = "="
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self):
        if not 0 <= self.min_value <= self.max_value <= 99:
            raise ValueError(f"need 0 <= min_value <= max_value <= 99, got {self.min_value}, {self.max_value}")
        self.operations = tuple(self.operations)
        bad = [op for op in self.operations if op not in _OP_WORDS]
        if not self.operations or bad:
            raise ValueError(f"`operations` must be a non-empty subset of {tuple(_OP_WORDS)}, got {self.operations}")
        if not spoken_task_available():
            raise RuntimeError("the spoken-arithmetic task needs `espeak-ng` and `sox` on PATH (Debian/Ubuntu: "
                               "apt-get install espeak-ng sox); make_audio_task(kind='auto') falls back to the "
                               "numpy-only BeepCountTask")
        key = {"task": "spoken_arith", "voice": self.voice, "speed": int(self.speed), "rate": SAMPLE_RATE}
        root = Path(self.cache_dir) if self.cache_dir is not None else cache_root() / "audio"
        self.directory = root / f"spoken_arith-{_fingerprint(key)}"

    def __len__(self) -> int:
        return _INFINITE

    def problem(self, index: int) -> tuple[int, str, int, int]:
        """``(a, op, b, answer)`` of problem ``index``."""
        rng = np.random.default_rng([int(self.seed), int(index)])
        a, b = (int(v) for v in rng.integers(self.min_value, self.max_value + 1, size=2))
        op = self.operations[int(rng.integers(len(self.operations)))]
        if op == "-" and a < b:
            a, b = b, a
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        return a, op, b, answer

    def clip(self, text: str) -> Path:
        """The cached WAV of ``text`` (synthesized on first use)."""
        path = self.directory / (re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") + ".wav")
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            _synthesize(text, path, self.voice, int(self.speed))
        return path

    def __getitem__(self, index: int) -> dict[str, Any]:
        a, op, b, answer = self.problem(index)
        text = f"what is {number_to_words(a)} {_OP_WORDS[op]} {number_to_words(b)}"
        return {"audio": str(self.clip(text)), "prompt": self.prompt, "answer": str(answer), "transcript": text,
                "index": int(index)}


@dataclasses.dataclass
class BeepCountTask:
    """The numpy-only fallback task: count the beeps. Rows as :class:`SpokenArithmeticTask`'s.

    Clip ``index``: ``n ~ U{min_beeps..max_beeps}`` tone bursts (0.12 s, 440-1320 Hz, 10 ms ramps) at random
    non-overlapping onsets over ``seconds`` of low noise, all from ``np.random.default_rng([seed, index])``;
    answer ``str(n)``. Clips are cached as WAVs under ``cache_dir`` (default ``cache_root() / 'audio'``).
    """

    min_beeps: int = 1
    max_beeps: int = 5
    seconds: float = 2.0
    seed: int = 0
    prompt: str = "="
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self):
        slots = int(self.seconds / 0.3)
        if not 1 <= self.min_beeps <= self.max_beeps <= slots:
            raise ValueError(f"need 1 <= min_beeps <= max_beeps <= {slots} (for {self.seconds} s), got "
                             f"{self.min_beeps}, {self.max_beeps}")
        key = {"task": "beeps", "seconds": float(self.seconds), "seed": int(self.seed), "rate": SAMPLE_RATE,
               "min": int(self.min_beeps), "max": int(self.max_beeps), "version": 1}
        root = Path(self.cache_dir) if self.cache_dir is not None else cache_root() / "audio"
        self.directory = root / f"beeps-{_fingerprint(key)}"

    def __len__(self) -> int:
        return _INFINITE

    def samples(self, index: int) -> tuple[np.ndarray, int]:
        """``(float32 samples [seconds * 16000], number of beeps)`` of clip ``index``."""
        rng = np.random.default_rng([int(self.seed), int(index)])
        n = int(rng.integers(self.min_beeps, self.max_beeps + 1))
        total = int(self.seconds * SAMPLE_RATE)
        x = (0.01 * rng.standard_normal(total)).astype(np.float32)
        slot = int(0.3 * SAMPLE_RATE)
        beep = int(0.12 * SAMPLE_RATE)
        starts = np.sort(rng.choice(total // slot, size=n, replace=False)) * slot
        t = np.arange(beep) / SAMPLE_RATE
        ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        for s in starts:
            freq = float(rng.uniform(440.0, 1320.0))
            s = int(s + rng.integers(0, slot - beep))
            x[s:s + beep] += (0.5 * ramp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        return x, n

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.directory / f"{int(index)}.wav"
        x, n = self.samples(index)
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            write_wav(path, x)
        return {"audio": str(path), "prompt": self.prompt, "answer": str(n), "transcript": f"{n} beeps",
                "index": int(index)}


def make_audio_task(kind: str = "auto", *, seed: int = 0, **kwargs: Any):
    """The built-in audio task ``kind``: ``'spoken_arithmetic'``, ``'beeps'`` or ``'auto'`` (the spoken task
    when ``espeak-ng`` and ``sox`` are installed, else the beep-counting fallback, with a logged note).
    ``kwargs`` go to the task (those of the other task are ignored with ``'auto'``)."""
    if kind == "auto":
        kind = "spoken_arithmetic" if spoken_task_available() else "beeps"
        if kind == "beeps":
            log.warning("espeak-ng / sox not found: using the numpy-only beep-counting task instead of spoken "
                        "arithmetic (install them: apt-get install espeak-ng sox)")
    if kind == "spoken_arithmetic":
        fields = {f.name for f in dataclasses.fields(SpokenArithmeticTask)}
        return SpokenArithmeticTask(seed=seed, **{k: v for k, v in kwargs.items() if k in fields})
    if kind == "beeps":
        fields = {f.name for f in dataclasses.fields(BeepCountTask)}
        return BeepCountTask(seed=seed, **{k: v for k, v in kwargs.items() if k in fields})
    raise ValueError(f"unknown audio task {kind!r}; choose 'spoken_arithmetic', 'beeps' or 'auto'")


# ----------------------------------------------------------------------------------------------------------
# Multiple-choice jsonl (AVQA / MMAU shape)
# ----------------------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

DEFAULT_CHOICE_TEMPLATE = ("{question}\n{options}\nThink about the question in <think> </think>, then give the "
                           "letter of the correct option in <answer> </answer>.")
# The option-text variant (R1-AQA's answer format, scored like MMAU's evaluation: ``mmau_accuracy``).
TEXT_CHOICE_TEMPLATE = ("{question}\n{options}\nThink about the question in <think> </think>, then give the "
                        "text of the correct option in <answer> </answer>.")
ON_BAD_ROW = ("raise", "skip")
_BAD_ROWS_SHOWN = 5


def format_choices_prompt(question: str, choices: Sequence[str], template: str = DEFAULT_CHOICE_TEMPLATE) -> str:
    """The text prompt of a multiple-choice question: ``template`` with ``{question}`` and ``{options}``
    (one ``(A) text`` line per choice)."""
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return template.format(question=question, options=options)


def bad_rows_error(path: str, bad: Sequence[tuple[int, str]], total: int) -> ValueError:
    """One ``ValueError`` for the bad lines of a data file: ``path:line: reason`` for the first few, the count,
    and the setting that skips them (``data.on_bad_row='skip'``)."""
    shown = "; ".join(f"{path}:{line}: {reason}" for line, reason in bad[:_BAD_ROWS_SHOWN])
    more = f" (and {len(bad) - _BAD_ROWS_SHOWN} more)" if len(bad) > _BAD_ROWS_SHOWN else ""
    head = "" if len(bad) == 1 else f"{len(bad)} bad rows of {total} in {path}: "
    return ValueError(f"{head}{shown}{more}. Fix the file or set --config.data.on_bad_row=skip to skip bad rows "
                      "(they are counted and logged).")


def report_skipped_rows(path: str, bad: Sequence[tuple[int, str]], total: int) -> None:
    """Logs the rows skipped with ``on_bad_row='skip'`` (count and the first reasons)."""
    if bad:
        log.warning("%s: skipped %d bad row(s) of %d (data.on_bad_row='skip'): %s%s", path, len(bad), total,
                    "; ".join(f"line {line}: {reason}" for line, reason in bad[:_BAD_ROWS_SHOWN]),
                    " ..." if len(bad) > _BAD_ROWS_SHOWN else "")


class AudioChoiceJsonlSource:
    """Multiple-choice audio questions from a jsonl file (see the module docstring).

    Args:
      path: the jsonl file (:func:`convert_mmau` / :func:`convert_avqa` write it from the datasets' own files).
      template: the prompt template (:func:`format_choices_prompt`; :data:`DEFAULT_CHOICE_TEMPLATE` asks for the
        letter, :data:`TEXT_CHOICE_TEMPLATE` for the option text).
      check_audio: open every audio file's header at load (:func:`wav_info`): a missing, unreadable, truncated,
        empty or unsupported file is a bad row, found now rather than at the step that first samples it.
      on_bad_row: ``'raise'`` (default: one ``ValueError`` naming the file, each bad line and its reason) or
        ``'skip'`` (drop the bad rows; counted in ``num_skipped``, listed in ``skipped`` and logged).

    Bad rows: invalid JSON, not an object, a missing field, an empty or non-string question, fewer than 2 or more
    than 26 choices, a null choice, an answer that is none of the choices (by text, letter or index), a bad audio
    file. ``audio_seconds`` / ``sample_rates`` hold each kept row's clip length and the files' rates.
    """

    def __init__(self, path: str | os.PathLike, *, template: str = DEFAULT_CHOICE_TEMPLATE, check_audio: bool = True,
                 on_bad_row: str = "raise"):
        if on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"`on_bad_row` must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
        self.path = os.fspath(path)
        base = Path(self.path).resolve().parent
        self.examples: list[dict[str, Any]] = []
        self.audio_seconds: list[float] = []
        self.sample_rates: dict[int, int] = {}
        self.skipped: list[tuple[int, str]] = []
        probed: dict[str, WavInfo | str] = {}
        total = 0
        with open(self.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                total += 1
                try:
                    row, info = self._parse(line, base, check_audio, probed, template)
                except ValueError as err:
                    self.skipped.append((line_no, str(err)))
                    continue
                row["index"] = len(self.examples)
                self.examples.append(row)
                if info is not None:
                    self.audio_seconds.append(info.seconds)
                    self.sample_rates[info.sample_rate] = self.sample_rates.get(info.sample_rate, 0) + 1
        if self.skipped and on_bad_row == "raise":
            raise bad_rows_error(self.path, self.skipped, total)
        report_skipped_rows(self.path, self.skipped, total)
        if not self.examples:
            raise ValueError(f"{self.path} holds no examples")
        if self.sample_rates:
            log.info("%s: %d rows; audio sample rates %s (resampled to %d Hz); clip length %.1f-%.1f s", self.path,
                     len(self.examples), dict(sorted(self.sample_rates.items())), SAMPLE_RATE,
                     min(self.audio_seconds), max(self.audio_seconds))

    @staticmethod
    def _parse(line: str, base: Path, check_audio: bool, probed: dict, template: str):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid JSON ({err})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        for key in ("audio", "question", "choices", "answer"):
            if key not in obj:
                raise ValueError(f"missing field {key!r} (fields: {sorted(obj)})")
        question = obj["question"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"`question` must be a non-empty string, got {question!r}")
        choices = obj["choices"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"`choices` must be a list of 2..26 options, got {choices!r}")
        if any(c is None or isinstance(c, (list, dict)) for c in choices):
            raise ValueError(f"`choices` must be strings (or numbers), got {choices!r}")
        choices = [str(c) for c in choices]
        if obj["answer"] is None or isinstance(obj["answer"], (bool, list, dict, float)):
            raise ValueError(f"`answer` must be an option's text, letter or 0-based index, got {obj['answer']!r}")
        index = _answer_index(obj["answer"], choices)
        if index is None:
            raise ValueError(f"answer {obj['answer']!r} is none of the choices {choices} (by text, letter or "
                             "0-based index)")
        if not isinstance(obj["audio"], str) or not obj["audio"]:
            raise ValueError(f"`audio` must be a file path, got {obj['audio']!r}")
        audio = Path(os.path.expanduser(obj["audio"]))
        audio = audio if audio.is_absolute() else base / audio
        info = None
        if check_audio:
            key = str(audio)
            if key not in probed:
                if not audio.exists():
                    probed[key] = f"audio file {key!r} does not exist"
                else:
                    try:
                        probed[key] = wav_info(audio)
                    except ValueError as err:
                        probed[key] = f"audio file: {err}"
            if isinstance(probed[key], str):
                raise ValueError(probed[key])
            info = probed[key]
        extra = {k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool))
                 and k not in ("audio", "question", "choices", "answer", "prompt", "index")
                 and k not in ("prompts", "completions", "completion_ids")}
        row = {**extra, "audio": str(audio), "question": question, "choices": choices, "answer": choices[index],
               "answer_letter": LETTERS[index], "prompt": format_choices_prompt(question, choices, template)}
        return row, info

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def num_longer_than(self, seconds: float) -> int:
        """How many rows' clips exceed ``seconds`` (those the features cut at ``audio.seconds``)."""
        return sum(s > seconds for s in self.audio_seconds)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = dict(self.examples[index])
        row["choices"] = list(row["choices"])
        return row


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).strip()


def _answer_index(answer: Any, choices: Sequence[str]) -> int | None:
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer if 0 <= answer < len(choices) else None
    text = str(answer)
    norm = [_norm(c) for c in choices]
    if _norm(text) in norm:
        return norm.index(_norm(text))
    letter = re.fullmatch(r"\s*\(?([A-Za-z])\)?[.:]?\s*", text)
    if letter and LETTERS.index(letter.group(1).upper()) < len(choices):
        return LETTERS.index(letter.group(1).upper())
    return None


# ----------------------------------------------------------------------------------------------------------
# Converters from the datasets' own files
# ----------------------------------------------------------------------------------------------------------


def _load_json_array(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a JSON document ({err}); MMAU / AVQA annotations are one JSON array") \
                from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ValueError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    return data


def _write_rows(rows: Sequence[Mapping[str, Any]], out: str | os.PathLike) -> int:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return len(rows)


def convert_mmau(src: str | os.PathLike, out: str | os.PathLike, *, audio_root: str | os.PathLike | None = None
                 ) -> int:
    """MMAU's JSON array (``mmau-test-mini.json``: ``{"id", "audio_id": "./test-mini-audios/x.wav", "question",
    "choices", "answer", "task", "difficulty", "category", "sub-category", ...}``) -> a jsonl of this module's rows
    ``{"audio", "question", "choices", "answer", "id", "task", "difficulty", "category", "sub_category",
    "dataset"}`` (``task`` is MMAU's sound / music / speech: :func:`accuracy_by_category` groups by it).

    ``audio_id`` is resolved against ``audio_root`` (default: ``src``'s directory) and written as an absolute
    path. Returns the number of rows. Raises ``ValueError`` naming the array index of an item without
    ``audio_id``, ``question``, ``choices`` or ``answer``.
    """
    root = Path(audio_root if audio_root is not None else Path(src).resolve().parent).expanduser().resolve()
    rows = []
    for i, item in enumerate(_load_json_array(src)):
        missing = [k for k in ("audio_id", "question", "choices", "answer") if k not in item]
        if missing:
            raise ValueError(f"{src}[{i}]: missing {missing} (fields: {sorted(item)})")
        audio = Path(os.path.expanduser(str(item["audio_id"])))
        row = {"audio": str(audio if audio.is_absolute() else (root / audio).resolve()),
               "question": item["question"], "choices": item["choices"], "answer": item["answer"]}
        for key in ("id", "task", "difficulty", "category", "sub-category", "dataset"):
            if key in item and isinstance(item[key], (str, int, float)):
                row[key.replace("-", "_")] = item[key]
        rows.append(row)
    return _write_rows(rows, out)


def convert_avqa(src: str | os.PathLike, out: str | os.PathLike, *, audio_dir: str | os.PathLike,
                 audio_ext: str = ".wav") -> int:
    """AVQA's annotation array (``train_qa.json`` / ``val_qa.json``: ``{"id", "video_name", "question_text",
    "multi_choice": [4 options], "answer": 0-based index, "question_type", "question_relation", ...}``) -> a
    jsonl of this module's rows. AVQA refers to video clips: extract their audio first, one file per video
    named ``{video_name}{audio_ext}`` in ``audio_dir``, e.g. ``ffmpeg -i V.mp4 -vn -ac 1 -ar 16000 V.wav``.
    Returns the number of rows; raises ``ValueError`` naming the array index of an incomplete item.
    """
    root = Path(audio_dir).expanduser().resolve()
    rows = []
    for i, item in enumerate(_load_json_array(src)):
        missing = [k for k in ("video_name", "question_text", "multi_choice", "answer") if k not in item]
        if missing:
            raise ValueError(f"{src}[{i}]: missing {missing} (fields: {sorted(item)}); is this AVQA's *_qa.json?")
        row = {"audio": str(root / f"{item['video_name']}{audio_ext}"), "question": item["question_text"],
               "choices": item["multi_choice"], "answer": item["answer"]}
        for key in ("id", "video_id", "question_type", "question_relation"):
            if key in item and isinstance(item[key], (str, int, float)):
                row[key] = item[key]
        rows.append(row)
    return _write_rows(rows, out)


# ----------------------------------------------------------------------------------------------------------
# Rewards and scoring
# ----------------------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_FORMAT = re.compile(r"^\s*(<think>(?:(?!</?think>|</?answer>).)*</think>\s*)?"
                     r"<answer>(?:(?!</?answer>|</?think>).)*</answer>\s*$", re.DOTALL | re.IGNORECASE)
# A letter-shaped answer: "B", "(B)", "B.", "B)", "B:", optionally followed by text ("(B) a dog").
_LETTER = re.compile(r"^(?P<open>\()?(?P<letter>[A-Za-z])(?P<close>\))?(?P<sep>[.:])?(?:\s+(?P<rest>.*))?$",
                     re.DOTALL)
_LETTER_PHRASE = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\s]\s*"
                            r"\(?([A-Za-z])\)?[.)]?$", re.IGNORECASE)
_OTHER_LETTER = re.compile(r"(?:^|\s)\(?[A-Z]\)?[.:)](?:\s|$)|\([A-Z]\)")


def answer_text(completion: str, *, require_tag: bool = True) -> str | None:
    """The answer a completion gives: the content of its one ``<answer>...</answer>`` block.

    None when there is no block or more than one (a hedge across blocks is no answer). With
    ``require_tag=False`` (tag-free prompts) a completion without any block answers with its text outside
    ``<think>...</think>``."""
    tags = _ANSWER_TAG.findall(completion)
    if len(tags) == 1:
        return tags[0].strip()
    if tags or require_tag:
        return None
    return _THINK.sub(" ", completion).strip()


_HEDGE = -1


def _letter_index(text: str, choices: Sequence[str]) -> int | None:
    """The option a letter-shaped answer names; None when it is not letter-shaped or out of range; ``_HEDGE``
    when the letter is followed by a second letter or another option's text."""
    m = _LETTER.match(text)
    if m and (m["rest"] is None or m["open"] or m["close"] or m["sep"]):  # not "a dog", "B minor" (words)
        i = LETTERS.index(m["letter"].upper())
        if i >= len(choices):
            return None
        rest = (m["rest"] or "").strip()
        if rest:
            if _OTHER_LETTER.search(rest):
                return _HEDGE  # "A. cat or B. dog": two letters
            others = [j for j, c in enumerate(choices) if j != i and _norm(c) and _norm(c) != _norm(choices[i])
                      and re.search(rf"\b{re.escape(_norm(c))}\b", _norm(rest))
                      and not re.search(rf"\b{re.escape(_norm(c))}\b", _norm(choices[i]))]
            if others:
                return _HEDGE  # the text after the letter names another option
        return i
    m = _LETTER_PHRASE.match(text)
    if m:
        i = LETTERS.index(m.group(1).upper())
        return i if i < len(choices) else None
    return None


def parse_choice(completion: str, choices: Sequence[str], *, require_tag: bool = True) -> int | None:
    """The 0-based option a completion chooses, or None (no accuracy reward).

    The answer is the content of the completion's single ``<answer>...</answer>`` block (:func:`answer_text`:
    none, or several blocks, is no answer; ``require_tag=False`` falls back to the text outside ``<think>``).
    It is matched, in order:

    1. a letter (what :data:`DEFAULT_CHOICE_TEMPLATE` asks for): ``B``, ``(B)``, ``B.``, ``B)``, ``(B) text``,
       ``answer is B`` -- so when option texts are themselves letters (note names), the letter wins; text after
       the letter that names another option, or a second letter (``A. cat or B. dog``), is a hedge: None;
    2. an option's text (case and punctuation ignored);
    3. the one option whose text the answer contains (None when it contains several).

    >>> parse_choice("<think>it barks</think><answer>(B) a dog</answer>", ["a cat", "a dog"])
    1
    >>> parse_choice("<think>It is not rain; I need more", ["cat", "rain"]) is None   # no answer given
    True
    >>> parse_choice("<answer>(B)</answer>", ["B", "A", "C"]), parse_choice("<answer>a cat</answer>", ["a cat", "b"])
    (1, 0)
    """
    text = answer_text(completion, require_tag=require_tag)
    if not text:
        return None
    i = _letter_index(text, choices)
    if i is not None:
        return None if i == _HEDGE else i
    norm = [_norm(c) for c in choices]
    t = _norm(text)
    if not t:
        return None
    if t in norm:
        return norm.index(t)
    if _LETTER.match(text) and len(text) <= 3:
        return None  # a letter beyond the options
    hits = [i for i, c in enumerate(norm) if c and re.search(rf"\b{re.escape(c)}\b", t)]
    return hits[0] if len(hits) == 1 else None


def mmau_string_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
    """MMAU's official option-text scorer (its ``evaluation.py`` ``string_match``): with word-token sets
    ``tok(s) = set(re.findall(r'\\b\\w+\\b', s.lower()))``, correct iff every token of the answer is in the
    prediction and the prediction holds no token of another option that is not also the answer's.

    >>> mmau_string_match("dog barking", "the dog is barking", ["cat", "dog barking"])
    True
    >>> mmau_string_match("dog barking", "dog barking or cat", ["cat", "dog barking"])
    False
    """
    def tok(s):
        return set(re.findall(r"\b\w+\b", str(s).lower()))

    pred, ans = tok(prediction), tok(answer)
    if not pred:
        return False
    wrong: set[str] = set()
    for c in choices:
        ct = tok(c)
        if ct != ans:
            wrong |= ct - ans
    return ans <= pred and pred.isdisjoint(wrong)


def _require_columns(name: str, choices: Sequence[Sequence[str]] | None,
                     answer: Sequence[str] | None) -> tuple[Sequence[Sequence[str]], Sequence[str]]:
    if choices is None or answer is None:
        raise ValueError(f"{name} needs the `choices` and `answer` columns (an audio multiple-choice source such as "
                         "AudioChoiceJsonlSource)")
    return choices, answer


def choice_accuracy_reward(prompts: Sequence[str], completions: Sequence[str],
                           choices: Sequence[Sequence[str]] | None = None, answer: Sequence[str] | None = None,
                           **unused_columns) -> list[float]:
    """1.0 when the completion's single ``<answer>`` block chooses the correct option (:func:`parse_choice`:
    the letter first), else 0.0 (also without an answer block). Needs the columns ``choices`` (option texts per
    row) and ``answer`` (the correct option's text)."""
    del prompts, unused_columns
    choices, answer = _require_columns("choice_accuracy_reward", choices, answer)
    out = []
    for completion, opts, ans in zip(completions, choices, answer, strict=True):
        chosen = parse_choice(completion, opts)
        out.append(1.0 if chosen is not None and chosen == _answer_index(ans, opts) else 0.0)
    return out


def choice_accuracy_untagged_reward(prompts: Sequence[str], completions: Sequence[str],
                                    choices: Sequence[Sequence[str]] | None = None, answer: Sequence[str] | None = None,
                                    **unused_columns) -> list[float]:
    """:func:`choice_accuracy_reward` for tag-free prompts: a completion without ``<answer>`` answers with its
    text outside ``<think>`` (``parse_choice(..., require_tag=False)``)."""
    del prompts, unused_columns
    choices, answer = _require_columns("choice_accuracy_untagged_reward", choices, answer)
    out = []
    for completion, opts, ans in zip(completions, choices, answer, strict=True):
        chosen = parse_choice(completion, opts, require_tag=False)
        out.append(1.0 if chosen is not None and chosen == _answer_index(ans, opts) else 0.0)
    return out


def mmau_accuracy_reward(prompts: Sequence[str], completions: Sequence[str],
                         choices: Sequence[Sequence[str]] | None = None, answer: Sequence[str] | None = None,
                         **unused_columns) -> list[float]:
    """MMAU's scorer on the answer: 1.0 when the content of the completion's single ``<answer>`` block passes
    :func:`mmau_string_match` against the correct option's text (the R1-AQA / MMAU protocol; pair it with
    :data:`TEXT_CHOICE_TEMPLATE`), else 0.0. The letter variant is ``choice_accuracy``."""
    del prompts, unused_columns
    choices, answer = _require_columns("mmau_accuracy_reward", choices, answer)
    out = []
    for completion, opts, ans in zip(completions, choices, answer, strict=True):
        text = answer_text(completion)
        i = _answer_index(ans, opts)
        correct = opts[i] if i is not None else str(ans)
        out.append(1.0 if text and mmau_string_match(correct, text, opts) else 0.0)
    return out


def answer_format_reward(prompts: Sequence[str], completions: Sequence[str], **unused_columns) -> list[float]:
    """1.0 for a completion of the form ``[<think>...</think>] <answer>...</answer>`` with exactly one of each
    (whitespace around allowed; no tag inside another), else 0.0."""
    del prompts, unused_columns
    return [1.0 if _FORMAT.match(c) else 0.0 for c in completions]


def accuracy_by_category(scores: Sequence[float] | np.ndarray, categories: Sequence[Any], *,
                         prefix: str = "eval/accuracy",
                         valid: Sequence[bool] | np.ndarray | None = None) -> dict[str, float]:
    """Per-category means of ``scores`` (e.g. MMAU's ``task`` column: sound / music / speech):
    ``{f"{prefix}/{category}": mean}`` over the rows where ``valid`` (default all), plus
    ``f"{prefix}_macro"``, the unweighted mean over categories (MMAU's tables report the categories and the
    overall mean, which is ``prefix`` itself). Rows whose category is None or '' are left out."""
    values = np.asarray(scores, np.float64)
    if len(categories) != len(values):
        raise ValueError(f"{len(values)} scores but {len(categories)} categories")
    keep = np.ones(len(values), bool) if valid is None else np.asarray(valid, bool)
    groups: dict[str, list[float]] = {}
    for s, c, k in zip(values, categories, keep):
        if k and c is not None and str(c) != "":
            groups.setdefault(str(c), []).append(float(s))
    out = {f"{prefix}/{c}": float(np.mean(v)) for c, v in sorted(groups.items())}
    if groups:
        out[f"{prefix}_macro"] = float(np.mean([np.mean(v) for v in groups.values()]))
    return out


register_reward_function("choice_accuracy", choice_accuracy_reward)
register_reward_function("choice_accuracy_untagged", choice_accuracy_untagged_reward)
register_reward_function("mmau_accuracy", mmau_accuracy_reward)
register_reward_function("answer_format", answer_format_reward)


# ----------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------


class LogMelFeatures:
    """Whisper log-mel features of 16 kHz clips: transformers' ``WhisperFeatureExtractor`` (n_fft 400, hop 160)
    built from constructor arguments, as ``Qwen2AudioProcessor`` / ``Qwen2_5OmniProcessor`` use it.

    ``__call__(list of float32 sample arrays) -> (input_features [B, n_mels, F] float32,
    feature_attention_mask [B, F] int32)``, where:

    * fixed window (``pad_multiple_s=None``, Qwen2-Audio's encoder): ``F = 100 * seconds``;
    * variable (``pad_multiple_s`` set, the Omni thinker's chunked encoder): ``F`` = the batch's longest clip
      (at most ``seconds``) rounded up to a multiple of ``pad_multiple_s`` (Omni: its 2 s chunk), so a 10 s
      clip runs 5 chunks instead of a 30 s window's 15. The features of a clip's frames equal the Omni
      processor's (``chunk_length`` 300: padding beyond the clip does not change them).

    Clips longer than ``seconds`` are cut to it, as the processor with ``chunk_length = seconds`` does: each is
    counted (``num_cut`` of ``num_clips``; :meth:`metrics`) and the first cut is logged as a warning that names
    the setting (``audio.seconds``). :meth:`for_encoder` picks the mode an encoder config supports.
    """

    def __init__(self, n_mels: int = 128, seconds: float = 30.0, *, pad_multiple_s: float | None = None):
        from transformers import WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel
        if n_mels < 1 or seconds <= 0:
            raise ValueError(f"need n_mels >= 1 and seconds > 0, got {n_mels}, {seconds}")
        if pad_multiple_s is not None and not 0 < pad_multiple_s <= seconds:
            raise ValueError(f"need 0 < pad_multiple_s <= seconds, got {pad_multiple_s}, {seconds}")
        self.n_mels, self.seconds = int(n_mels), float(seconds)
        self.num_samples = round(seconds * SAMPLE_RATE)
        self.num_frames = self.num_samples // 160
        self.pad_multiple_frames = None if pad_multiple_s is None else max(1, round(pad_multiple_s * 100))
        self.extractor = WhisperFeatureExtractor(feature_size=self.n_mels, sampling_rate=SAMPLE_RATE, hop_length=160,
                                                 chunk_length=max(1, int(np.ceil(seconds))), n_fft=400)
        self.num_cut = 0
        self.num_clips = 0
        self.longest_cut_s = 0.0

    @classmethod
    def for_encoder(cls, audio_config: Any, seconds: float | None = None) -> "LogMelFeatures":
        """The features an audio encoder config (``adrpo_jax.models.audio_llm.AudioEncoderConfig``) takes:

        * ``kind='whisper'`` (Qwen2-Audio): its fixed window of ``2 * max_source_positions`` frames (30 s); a
          different ``seconds`` is refused (the encoder cannot run it);
        * ``kind='omni'`` (Qwen2.5-Omni thinker): variable length in chunks of ``2 * n_window`` frames, clips cut
          at ``seconds`` (default 300 s, the Omni processor's ``chunk_length``).
        """
        n_mels = int(audio_config.num_mel_bins)
        if audio_config.kind == "whisper":
            window = 2 * int(audio_config.max_source_positions) / 100.0
            if seconds is not None and abs(float(seconds) - window) > 1e-9:
                raise ValueError(f"audio.seconds={seconds}: the Qwen2-Audio encoder runs a fixed window of "
                                 f"{window:g} s (2 * max_source_positions mel frames); set audio.seconds={window:g}")
            return cls(n_mels, window)
        return cls(n_mels, 300.0 if seconds is None else float(seconds),
                   pad_multiple_s=2 * int(audio_config.n_window) / 100.0)

    def _count_cuts(self, clips: Sequence[np.ndarray]) -> None:
        self.num_clips += len(clips)
        long = [len(c) / SAMPLE_RATE for c in clips if len(c) > self.num_samples]
        if long:
            if self.num_cut == 0:
                log.warning("an audio clip of %.1f s was cut to audio.seconds=%g s (the model hears only its start); "
                            "raise audio.seconds to keep long clips (the cut clips are counted in audio/clips_cut)",
                            max(long), self.seconds)
            self.num_cut += len(long)
            self.longest_cut_s = max(self.longest_cut_s, max(long))

    def metrics(self) -> dict[str, float]:
        """``{"audio/clips_cut": clips cut at seconds so far, "audio/clips_cut_fraction": of the clips seen}``."""
        return {"audio/clips_cut": float(self.num_cut),
                "audio/clips_cut_fraction": float(self.num_cut / max(1, self.num_clips))}

    def __call__(self, clips: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        clips = [np.asarray(c, np.float32) for c in clips]
        self._count_cuts(clips)
        clips = [c[: self.num_samples] for c in clips]
        if self.pad_multiple_frames is None:
            frames = self.num_frames
        else:
            longest = max([-(-len(c) // 160) for c in clips] + [1])
            frames = min(self.num_frames, -(-longest // self.pad_multiple_frames) * self.pad_multiple_frames)
            frames = max(frames, self.pad_multiple_frames)
        # Zero padding past the clip (at least one FFT window), as the processors' max_length padding gives.
        length = max(self.num_samples, frames * 160) if self.pad_multiple_frames is None else frames * 160 + 400
        out = self.extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="max_length",
                             max_length=length, truncation=True, return_attention_mask=True)
        feats = np.asarray(out["input_features"], np.float32)[:, :, :frames]
        mask = np.asarray(out["attention_mask"], np.int32)[:, :frames]
        return feats, mask

    @staticmethod
    def stack(features: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Stacks per-clip ``features [n_mels, F_i]`` / ``masks [F_i]`` (e.g. from a per-clip cache in the
        variable mode) into ``[B, n_mels, max F_i]`` / ``[B, max F_i]``, zero-padded (mask 0) on the right."""
        width = max(f.shape[-1] for f in features)
        feats = np.stack([np.pad(f, ((0, 0), (0, width - f.shape[-1]))) for f in features]).astype(np.float32)
        mask = np.stack([np.pad(m, (0, width - m.shape[-1])) for m in masks]).astype(np.int32)
        return feats, mask

    def from_paths(self, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Features of WAV files (each read once per call)."""
        cache: dict[str, np.ndarray] = {}
        clips = []
        for p in paths:
            if p not in cache:
                cache[p] = read_wav(p)
            clips.append(cache[p])
        return self(clips)


# ----------------------------------------------------------------------------------------------------------
# Start-of-run data check and the converters' command line
# ----------------------------------------------------------------------------------------------------------


def check_audio_data(config: Any) -> dict[str, AudioChoiceJsonlSource]:
    """Checks the audio trainer's data files before anything heavy is loaded (call it first thing).

    For ``audio.task='jsonl'``: loads ``data.path`` (and ``eval.path`` when set) as
    :class:`AudioChoiceJsonlSource` with every audio header opened (``data.on_bad_row``, default ``'raise'``),
    and logs how many clips are longer than ``audio.seconds`` (they would be cut). Returns ``{key: source}``
    (reusable by the trainer); the built-in tasks need no check (``{}``).

    Raises :class:`~adrpo_jax.train.config.ConfigError` naming the key (``data.path`` / ``eval.path``) with the
    file's first bad lines and the setting that skips them (``data.on_bad_row=skip``).
    """
    from adrpo_jax.train.config import ConfigError  # pylint: disable=import-outside-toplevel
    audio = config.get("audio", None)
    if audio is None or audio.get("task", "") != "jsonl":
        return {}
    on_bad_row = str(config.data.get("on_bad_row", "raise"))
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"`data.on_bad_row`={on_bad_row!r} must be one of {ON_BAD_ROW}.", key="data.on_bad_row",
                          value=on_bad_row)
    seconds = float(audio.get("seconds", 30.0))
    out = {}
    for key in ("data.path", "eval.path"):
        section, name = key.split(".")
        path = str(config[section].get(name, "") or "")
        if not path:
            continue
        try:
            source = AudioChoiceJsonlSource(os.path.expanduser(path), on_bad_row=on_bad_row)
        except (ValueError, OSError) as err:
            raise ConfigError(f"`{key}`: {err}", key=key, value=path) from None
        long = source.num_longer_than(seconds)
        if long:
            log.warning("%s: %d of %d clips are longer than audio.seconds=%g s (longest %.1f s) and will be cut",
                        path, long, len(source), seconds, max(source.audio_seconds))
        out[key] = source
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adrpo_jax.rl.audio_data mmau SRC.json OUT.jsonl [--audio-root DIR]`` or
    ``... avqa SRC.json OUT.jsonl --audio-dir DIR [--audio-ext .wav]``; then checks OUT like the trainer."""
    import argparse  # pylint: disable=import-outside-toplevel
    parser = argparse.ArgumentParser(prog="python -m adrpo_jax.rl.audio_data",
                                     description="Convert MMAU / AVQA annotations to the audio trainer's jsonl.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    p = sub.add_parser("mmau", help="MMAU's JSON array (e.g. mmau-test-mini.json)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--audio-root", default=None, help="directory audio_id is relative to (default: SRC's)")
    p.add_argument("--on-bad-row", choices=ON_BAD_ROW, default="raise", help="check of the written file")
    p = sub.add_parser("avqa", help="AVQA's train_qa.json / val_qa.json (audio extracted from the videos)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--audio-dir", required=True, help="directory of {video_name}{audio_ext} files")
    p.add_argument("--audio-ext", default=".wav")
    p.add_argument("--on-bad-row", choices=ON_BAD_ROW, default="raise", help="check of the written file")
    args = parser.parse_args(argv)
    if args.dataset == "mmau":
        n = convert_mmau(args.src, args.out, audio_root=args.audio_root)
    else:
        n = convert_avqa(args.src, args.out, audio_dir=args.audio_dir, audio_ext=args.audio_ext)
    source = AudioChoiceJsonlSource(args.out, on_bad_row=args.on_bad_row)
    print(f"wrote {n} rows to {args.out}; {len(source)} load ({source.num_skipped} skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
