"""Corpus reading and leakage-free splits: no speaker or file on both sides, both classes present."""
import csv
from collections import Counter

import pytest

from pipeline.core.data import (Clip, CorpusError, check_two_classes, group_key, is_placeholder_speaker, read_corpus,
                                source_groups, split_by_source, split_by_speaker, split_groups)


def _clip(i, label, speaker, source="src"):
    return Clip(path=f"/c/{source}__x/{i}.wav", label=label, generator="g" if label else "human",
                speaker=speaker, language="en", source=source)


def _write_manifest(root, rows, header=("path", "label", "generator", "speaker", "language")):
    with (root / "MANIFEST.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_manifest_fields_and_source_from_folder(tmp_path):
    _write_manifest(tmp_path, [("ai/tts__v1/a.wav", "ai", "tts-1", "s1", "en"), ("human/lib__x/b.wav", "human", "", "", "")])
    clips = read_corpus(tmp_path)
    assert [c.label_name for c in clips] == ["ai", "human"], "labels are read in order"
    assert clips[0].source == "tts" and clips[1].source == "lib", "source is the folder prefix before __"
    assert clips[1].speaker == "unknown" and clips[1].generator == "human", "empty cells get documented defaults"


def test_bad_label_names_row(tmp_path):
    _write_manifest(tmp_path, [("a.wav", "robot", "", "", "")])
    with pytest.raises(CorpusError, match=r"MANIFEST.csv:2: label 'robot'"):
        read_corpus(tmp_path)


def test_folder_layout_without_manifest(tmp_path):
    for rel in ("human/a__x/1.wav", "ai/b__gen1/2.flac", "ai/b__gen1/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    clips = read_corpus(tmp_path)
    assert sorted(c.label_name for c in clips) == ["ai", "human"], "audio files only, labelled by folder"
    assert [c.generator for c in clips if c.label_name == "ai"] == ["b__gen1"], "generator is the AI clip's folder"


def test_speaker_split_is_disjoint_and_has_both_classes():
    clips = [_clip(i, i % 2, f"spk{i % 7}") for i in range(60)] + [_clip(100 + i, 1, "unknown") for i in range(10)]
    train, val = split_by_speaker(clips, 0.25, seed=3)
    known = lambda part: {c.speaker for c in part if not is_placeholder_speaker(c.speaker)}
    assert not known(train) & known(val), "no speaker on both sides"
    assert not {c.path for c in train} & {c.path for c in val}, "no file on both sides"
    assert Counter(c.label for c in val).keys() == {0, 1}, "validation holds both classes"
    assert len(train) + len(val) == len(clips), "every clip lands on exactly one side"
    assert split_by_speaker(clips, 0.25, seed=3) == (train, val), "the split is seeded"


def test_split_refuses_when_a_class_cannot_be_held_out():
    clips = [_clip(i, 0, "only-human") for i in range(5)] + [_clip(10 + i, 1, f"a{i}") for i in range(5)]
    with pytest.raises(CorpusError, match="validation split.*has only ai"):
        split_by_speaker(clips, 0.2, seed=0)


def test_leave_source_out():
    clips = [_clip(i, i % 2, f"s{i}", source=f"src{i % 3}") for i in range(9)]
    train, held = split_by_source(clips, {"src1"})
    assert {c.source for c in held} == {"src1"} and "src1" not in {c.source for c in train}, "a source stays on one side"


def test_one_class_is_refused_with_a_clear_message():
    with pytest.raises(CorpusError, match="only ai.*refused"):
        check_two_classes([_clip(1, 1, "x"), _clip(2, 1, "y")], "the fine-tuning set")


def test_shared_corpus_manifest(shared_corpus):
    clips = read_corpus(shared_corpus)
    counts = Counter(c.label_name for c in clips)
    assert counts == {"human": 458, "ai": 288}, f"the shared corpus has 458 human and 288 AI clips, got {counts}"
    assert all(c.path.exists() for c in clips), "every manifest path exists"
    train, val = split_by_speaker(clips, 0.2, seed=0)
    known = lambda part: {c.speaker for c in part if not is_placeholder_speaker(c.speaker)}
    assert not known(train) & known(val), "speaker-disjoint on real data"


@pytest.mark.parametrize("value", ["unknown", "see notes", "LibriTTS speaker (id prefix of file name)",
                                   "Korean speaker id in file name", "unknown (codec2 test speakers)", "", "n/a", "?"])
def test_placeholder_speakers_are_no_one(value):
    assert is_placeholder_speaker(value), f"{value!r} names no single speaker"


@pytest.mark.parametrize("value", ["LJ", "p234", "Allison Smith", "librispeech:1688", "Unknownia"])
def test_real_speaker_names_are_speakers(value):
    assert not is_placeholder_speaker(value), f"{value!r} is a speaker"


def test_placeholder_speaker_clips_are_split_by_file():
    # given: 20 clips whose manifest says "see notes" for the speaker, and 20 of real speakers
    clips = [_clip(i, i % 2, "see notes") for i in range(20)] + [_clip(100 + i, i % 2, f"spk{i % 5}") for i in range(20)]
    # when: split by speaker
    train, val = split_by_speaker(clips, 0.3, seed=1)
    # then: the placeholder is not one giant speaker: its clips land on both sides
    placeholder_sides = {side for side, part in (("train", train), ("val", val)) for c in part if c.speaker == "see notes"}
    assert placeholder_sides == {"train", "val"}, "clips with a placeholder speaker are split per file"


def test_source_split_keeps_linked_sources_together():
    # given: 6 sources, two of them linked (the same voice talent on two pages)
    clips = [_clip(i, i % 2, f"s{i}", source=f"src{i % 6}") for i in range(60)]
    linked = source_groups([["src1", "src4"]])
    for seed in range(8):
        # when: split by source
        train, val = split_groups(clips, 0.34, seed, "source", linked)
        # then: no source on both sides, and src1/src4 together
        assert not {c.source for c in train} & {c.source for c in val}, "whole sources on one side"
        side = {c.source: ("val" if c in val else "train") for c in clips}
        assert side["src1"] == side["src4"], "linked sources stay together"
        assert {c.label for c in val} == {0, 1}, "validation holds both classes"


def test_twins_follow_their_original_and_do_not_count():
    # given: human clips with a twin each, plus AI clips; split by file
    humans = [Clip(path=f"/h/{i}.wav", label=0, generator="human", speaker="x", language="en", source=f"s{i}",
                   sha256=f"h{i}") for i in range(20)]
    twins = [Clip(path=f"/t/{i}.flac", label=1, generator="twin-world", speaker="x", language="en", source=f"s{i}",
                  sha256=f"t{i}", twin_of=f"h{i}") for i in range(20)]
    ai = [Clip(path=f"/a/{i}.wav", label=1, generator="tts", speaker="y", language="en", source="tts", sha256=f"a{i}")
          for i in range(20)]
    train, val = split_groups(humans + twins + ai, 0.25, seed=0, by="file")
    val_humans = {c.sha256 for c in val if c.label == 0}
    assert {c.twin_of for c in val if c.twin_of} == val_humans, "a twin sits on its original's side"
    real_ai = [c for c in val if c.label == 1 and not c.twin_of]
    assert 5 <= len(val_humans) <= 7 and 1 <= len(real_ai) <= 7, \
        "targets count real clips only: 25 % of 20 per class, up to 1.5x (twins would have doubled the AI target)"
