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
  ``answer`` (the correct option's text), ``answer_letter`` and the rendered multiple-choice ``prompt``.

Features: :func:`read_wav` (stdlib ``wave``) and :class:`LogMelFeatures` (transformers'
``WhisperFeatureExtractor``, built from constructor arguments: no files, no network) give
``input_features [B, n_mels, L]`` float32 and ``feature_attention_mask [B, L]`` int32 (``L = 100 * seconds``).

Rewards (registered on import as ``choice_accuracy`` and ``answer_format``; also usable by path,
``'adrpo_jax.rl.audio_data:choice_accuracy_reward'``): :func:`choice_accuracy_reward` (1 when the option chosen
in ``<answer>...</answer>`` (or the whole completion) is the correct one, by letter or by text) and
:func:`answer_format_reward` (1 for ``[<think>...</think>] <answer>...</answer>``).

>>> choice_accuracy_reward(["q"] * 3, ["<answer>(B)</answer>", "a dog barking", "C"],
...                        choices=[["a cat", "a dog barking", "rain"]] * 3, answer=["a dog barking"] * 3)
[1.0, 1.0, 0.0]
>>> number_to_words(17), number_to_words(42)
('seventeen', 'forty two')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
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
    "AudioChoiceJsonlSource",
    "BeepCountTask",
    "LogMelFeatures",
    "SpokenArithmeticTask",
    "answer_format_reward",
    "choice_accuracy_reward",
    "format_choices_prompt",
    "make_audio_task",
    "number_to_words",
    "parse_choice",
    "read_wav",
    "spoken_task_available",
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


def read_wav(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples in ``[-1, 1]`` of a PCM WAV (8/16/32-bit; channels averaged), resampled to
    ``sample_rate`` by linear interpolation when the file's rate differs."""
    path = os.fspath(path)
    try:
        with wave.open(path, "rb") as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as err:
        raise ValueError(f"{path}: not a PCM WAV file ({err})") from None
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    x = x.reshape(-1, channels).mean(axis=1) if channels > 1 else x
    if rate != sample_rate and len(x):
        n_out = max(1, int(round(len(x) * sample_rate / rate)))
        x = np.interp(np.arange(n_out) * (rate / sample_rate), np.arange(len(x)), x).astype(np.float32)
    return np.ascontiguousarray(x, np.float32)


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


def format_choices_prompt(question: str, choices: Sequence[str], template: str = DEFAULT_CHOICE_TEMPLATE) -> str:
    """The text prompt of a multiple-choice question: ``template`` with ``{question}`` and ``{options}``
    (one ``(A) text`` line per choice)."""
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return template.format(question=question, options=options)


class AudioChoiceJsonlSource:
    """Multiple-choice audio questions from a jsonl file (see the module docstring).

    Args:
      path: the jsonl file.
      template: the prompt template (:func:`format_choices_prompt`).
      check_audio: raise when an audio file does not exist (at load, naming the line).

    Raises ``ValueError`` naming the line for invalid JSON, a missing field, fewer than 2 or more than 26
    choices, or an answer that is none of the choices (by text, letter or index).
    """

    def __init__(self, path: str | os.PathLike, *, template: str = DEFAULT_CHOICE_TEMPLATE, check_audio: bool = True):
        self.path = os.fspath(path)
        base = Path(self.path).resolve().parent
        self.examples: list[dict[str, Any]] = []
        with open(self.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.path}:{line_no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: invalid JSON ({err})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                for key in ("audio", "question", "choices", "answer"):
                    if key not in obj:
                        raise ValueError(f"{where}: missing field {key!r} (fields: {sorted(obj)})")
                choices = obj["choices"]
                if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
                    raise ValueError(f"{where}: `choices` must be a list of 2..26 options, got {choices!r}")
                choices = [str(c) for c in choices]
                index = _answer_index(obj["answer"], choices)
                if index is None:
                    raise ValueError(f"{where}: answer {obj['answer']!r} is none of the choices {choices} (by text, "
                                     "letter or 0-based index)")
                audio = Path(os.path.expanduser(str(obj["audio"])))
                audio = audio if audio.is_absolute() else base / audio
                if check_audio and not audio.exists():
                    raise ValueError(f"{where}: audio file {str(audio)!r} does not exist")
                extra = {k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool))
                         and k not in ("audio", "question", "choices", "answer", "prompt", "index")
                         and k not in ("prompts", "completions", "completion_ids")}
                self.examples.append({**extra, "audio": str(audio), "question": str(obj["question"]),
                                      "choices": choices, "answer": choices[index], "answer_letter": LETTERS[index],
                                      "prompt": format_choices_prompt(str(obj["question"]), choices, template),
                                      "index": len(self.examples)})
        if not self.examples:
            raise ValueError(f"{self.path} holds no examples")

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
# Rewards
# ----------------------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FORMAT = re.compile(r"^\s*(<think>.*?</think>\s*)?<answer>.*?</answer>\s*$", re.DOTALL | re.IGNORECASE)


def parse_choice(completion: str, choices: Sequence[str]) -> int | None:
    """The 0-based option a completion chooses, or None.

    The text inside the last ``<answer>...</answer>`` (else the whole completion) is matched, in order: an
    option's text (case and punctuation ignored), a bare letter (``B``, ``(B)``, ``B.``, ``B) text``), an option
    text contained in it when exactly one option's text is.

    >>> parse_choice("<think>it barks</think><answer>(B) a dog</answer>", ["a cat", "a dog"])
    1
    >>> parse_choice("I think it is a cat.", ["a cat", "a dog"]), parse_choice("no idea", ["a cat", "a dog"])
    (0, None)
    """
    tags = _ANSWER_TAG.findall(completion)
    text = tags[-1] if tags else completion
    norm = [_norm(c) for c in choices]
    t = _norm(text)
    if not t:
        return None
    if t in norm:
        return norm.index(t)
    letter = re.match(r"^\s*\(?([A-Za-z])\)?(?:[.:)\s]|$)", text.strip())
    if letter and (len(text.strip()) <= 3 or letter.group(0).strip().endswith((")", ".", ":"))):
        i = LETTERS.index(letter.group(1).upper())
        return i if i < len(choices) else None
    hits = [i for i, c in enumerate(norm) if c and re.search(rf"\b{re.escape(c)}\b", t)]
    return hits[0] if len(hits) == 1 else None


def choice_accuracy_reward(prompts: Sequence[str], completions: Sequence[str], choices: Sequence[Sequence[str]] = None,
                           answer: Sequence[str] = None, **unused_columns) -> list[float]:
    """1.0 when the completion chooses the correct option (:func:`parse_choice`), else 0.0.

    Needs the columns ``choices`` (list of option texts per row) and ``answer`` (the correct option's text)."""
    del prompts, unused_columns
    if choices is None or answer is None:
        raise ValueError("choice_accuracy_reward needs the `choices` and `answer` columns (an audio multiple-choice "
                         "source such as AudioChoiceJsonlSource)")
    out = []
    for completion, opts, ans in zip(completions, choices, answer, strict=True):
        chosen = parse_choice(completion, opts)
        correct = _answer_index(ans, opts)
        out.append(1.0 if chosen is not None and chosen == correct else 0.0)
    return out


def answer_format_reward(prompts: Sequence[str], completions: Sequence[str], **unused_columns) -> list[float]:
    """1.0 for a completion of the form ``[<think>...</think>] <answer>...</answer>`` (whitespace around
    allowed), else 0.0."""
    del prompts, unused_columns
    return [1.0 if _FORMAT.match(c) else 0.0 for c in completions]


register_reward_function("choice_accuracy", choice_accuracy_reward)
register_reward_function("answer_format", answer_format_reward)


# ----------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------


class LogMelFeatures:
    """Whisper log-mel features of 16 kHz clips, padded / cut to ``seconds``.

    ``__call__(list of float32 sample arrays) -> (input_features [B, n_mels, 100 * seconds] float32,
    feature_attention_mask [B, 100 * seconds] int32)``: transformers' ``WhisperFeatureExtractor`` (n_fft 400,
    hop 160) built from constructor arguments, as ``Qwen2AudioProcessor`` / ``Qwen2_5OmniProcessor`` use it.
    Clips longer than ``seconds`` are cut (counted in ``num_cut``).
    """

    def __init__(self, n_mels: int = 128, seconds: float = 30.0):
        from transformers import WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel
        if n_mels < 1 or seconds <= 0:
            raise ValueError(f"need n_mels >= 1 and seconds > 0, got {n_mels}, {seconds}")
        self.n_mels, self.seconds = int(n_mels), float(seconds)
        self.num_samples = int(round(seconds * SAMPLE_RATE))
        self.num_frames = self.num_samples // 160
        self.extractor = WhisperFeatureExtractor(feature_size=self.n_mels, sampling_rate=SAMPLE_RATE, hop_length=160,
                                                 chunk_length=max(1, int(np.ceil(seconds))), n_fft=400)
        self.num_cut = 0

    def __call__(self, clips: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        clips = [np.asarray(c, np.float32) for c in clips]
        self.num_cut += sum(len(c) > self.num_samples for c in clips)
        out = self.extractor([c[: self.num_samples] for c in clips], sampling_rate=SAMPLE_RATE, return_tensors="np",
                             padding="max_length", max_length=self.num_samples, truncation=True,
                             return_attention_mask=True)
        feats = np.asarray(out["input_features"], np.float32)[:, :, : self.num_frames]
        mask = np.asarray(out["attention_mask"], np.int32)[:, : self.num_frames]
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
