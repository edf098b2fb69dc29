"""Typed, validated settings read once from params.yaml (one section per concern or stage)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, NonNegativeFloat, PlainValidator, PositiveFloat,
                      ValidationError, field_validator, model_validator)

DEFAULT_PARAMS = Path("params.yaml")
log = logging.getLogger(__name__)


class Section(BaseModel):
    """Base for every section: frozen, and a misspelt key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class AudioConfig(Section):
    """Decoding and segmentation: every clip becomes mono float32 at `sample_rate`."""

    sample_rate: int = Field(24000, gt=0)
    segment_s: float = Field(3.0, gt=0)
    min_duration_s: float = Field(0.25, ge=0)
    silence_peak: float = Field(1e-4, ge=0, description="clips whose peak |x| stays below are silent")
    block_s: float = Field(60.0, gt=0, description="decode/stream block length")
    decode_timeout_s: float = Field(60.0, gt=0, description="a file still decoding after this long is refused "
                                    "(AudioError), so a pathological file cannot hold up a batch; not hashed")

    @property
    def segment_samples(self) -> int:
        return round(self.segment_s * self.sample_rate)


class FeatureConfig(Section):
    """Spectrogram front end of NEW models (a trained model carries its own in its checkpoint).

    kind: `mel` (n_mels bins, the production front end), `linear` (n_fft/2+1 log-linear bins,
    which keep the high-frequency detail vocoders leave; Mueller et al. 2022), `linear_bands` (n_mels
    triangular bands spaced evenly in Hz, the LFCC filterbank without its DCT: the high-frequency
    resolution of a linear scale at the mel front end's cost) or `auto`: linear_bands when the training
    humans are wideband, mel when they are telephone audio (`pipeline.core.features.resolve_kind`, chosen
    when a model is trained; its checkpoint records the kind it got). normalize: `rms` scales
    each window to one RMS before the log, so neither level nor the log floor can be a cue; `cmn`
    removes each bin's mean over the window (cepstral mean normalisation: a fixed channel response, a
    microphone's or a page's filter, is a constant per bin in the log domain); `none` is the production
    front end's behaviour (gain-invariant only through the mean removal)."""

    kind: Literal["auto", "mel", "linear", "linear_bands"] = "mel"
    normalize: Literal["none", "rms", "cmn"] = "none"
    n_mels: int = Field(80, gt=0)
    n_fft: int = Field(1024, gt=0)
    win_length: int = Field(1024, gt=0)
    hop_length: int = Field(240, gt=0)
    f_min: float = Field(20.0, ge=0)
    f_max: float = Field(12000.0, gt=0)
    log_floor: float = Field(1e-6, gt=0)

    def without_auto(self) -> "FeatureConfig":
        """`auto` read as the production mel: for models with no training audio to choose from (imported
        weights, which are production log-mel models, and untrained ones in benchmarks)."""
        return self.model_copy(update={"kind": "mel"}) if self.kind == "auto" else self

    @model_validator(mode="after")
    def _check(self) -> "FeatureConfig":
        if self.win_length > self.n_fft:
            raise ValueError("win_length must be <= n_fft")
        if self.f_min >= self.f_max:
            raise ValueError("f_min must be < f_max")
        return self


Prob = Annotated[float, Field(ge=0, le=1)]
Codec = Literal["mp3", "opus"]
SplitBy = Literal["source", "speaker", "file"]


def _ordered(r: tuple[float, float]) -> tuple[float, float]:
    if r[0] > r[1]:
        raise ValueError(f"range {r} must be (low, high) with low <= high")
    return r


_Ordered = AfterValidator(_ordered)
Range = Annotated[tuple[float, float], _Ordered]
NonNegRange = Annotated[tuple[NonNegativeFloat, NonNegativeFloat], _Ordered]
PositiveRange = Annotated[tuple[PositiveFloat, PositiveFloat], _Ordered]
ProbRange = Annotated[tuple[Prob, Prob], _Ordered]
Mp3Level = Annotated[float, Field(ge=0, le=0.99, description="libsndfile errors at 1.0 for MP3")]
Mp3Range = Annotated[tuple[Mp3Level, Mp3Level], _Ordered]


class AugmentConfig(Section):
    """Training-time augmentation (pipeline.core.augment); every transform has a switch and a probability."""

    copies: int = Field(20, gt=0, description="augmented copies per clip")
    noise: bool = True
    noise_prob: Prob = 1.0
    noise_base_level: float = Field(0.5, ge=0, description="noise RMS / signal RMS before scaling")
    noise_scale: NonNegRange = (0.25, 0.75)
    stretch: bool = True
    stretch_prob: Prob = 1.0
    stretch_range: PositiveRange = (0.9, 1.1)
    pitch_shift: bool = True
    pitch_shift_prob: Prob = 1.0
    pitch_shift_bins: int = Field(2, ge=0)
    codec: bool = True
    codec_prob: Prob = 0.5
    codec_formats: tuple[Codec, ...] = Field(("mp3", "opus"), min_length=1)
    mp3_levels: Mp3Range = (0.5, 0.95)
    opus_levels: ProbRange = (0.7, 0.95)
    gain: bool = True
    gain_prob: Prob = 1.0
    gain_db: Range = (-6.0, 6.0)
    band_limit: bool = True
    band_limit_prob: Prob = 0.3
    band_limit_highpass: bool = True
    spec_augment: bool = True
    spec_augment_prob: Prob = 1.0
    time_masks: int = Field(2, ge=0)
    time_mask_max: int = Field(20, ge=0)
    freq_masks: int = Field(2, ge=0)
    freq_mask_max: int = Field(8, ge=0)
    lowpass: bool = False
    lowpass_prob: Prob = 0.5
    lowpass_hz: PositiveRange = Field((3400.0, 11000.0), description="cut-off drawn uniformly, same for both labels")
    mulaw: bool = False
    mulaw_prob: Prob = 0.1
    rawboost: bool = False
    rawboost_prob: Prob = 0.3
    rawboost_snr_db: Range = (10.0, 40.0)


class ModelConfig(Section):
    """ResNet18 trunk width (64 = the production architecture) and head dropout."""

    base_width: int = Field(64, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1)


def _auto_or_count(minimum: int) -> Callable[[object], Literal["auto"] | int]:
    """The check of a setting that is "auto" or an integer >= minimum (an integer given as text is read as one)."""
    def check(value: object) -> Literal["auto"] | int:
        if value == "auto":
            return "auto"
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        raise ValueError(f"must be auto or an integer >= {minimum}, not {value!r}")
    return check


_workers = _auto_or_count(0)   # also `aivoice detect --workers`
Workers = Annotated[Literal["auto"] | int, PlainValidator(_workers)]


class DetectConfig(Section):
    """Scoring: sliding windows, aggregation and the default decision threshold."""

    model: str = Field("champion", description="registry alias, version, models:/ or runs:/ URI, or a checkpoint file")
    hop_s: float = Field(1.5, gt=0)
    aggregate: Literal["mean", "max"] = "mean"
    threshold: float = Field(0.5, ge=0, le=1)
    batch_windows: int = Field(32, gt=0)
    silent_window_db: float = Field(0.0, ge=0, description="leave windows this many dB below the clip's loudest "
                                    "window out of the clip score (0 = score every window)")
    workers: Workers = Field("auto", description="`aivoice detect`: processes that decode and compute features "
                             "ahead of the model (0 = in the main process; auto: pipeline.apps.decode_pool)")


class CalibrationConfig(Section):
    """The served threshold: the score above which at most target_fpr of held-out humans fall, found on
    humans neither trained on nor used to pick the checkpoint (bootstrap) or the epoch (fine-tuning)."""

    target_fpr: float = Field(0.01, ge=0, lt=1)
    min_humans: int = Field(50, gt=0, description="fewer calibration humans: a warning, and the validate gates "
                            "call the evidence insufficient")


class TrainConfig(Section):
    """Base training (bootstrap) of trunk and all three heads.

    Validation (checkpoint choice) holds out whole groups: sources by default, so the number it reports
    is for recording chains the model has not heard. `linked_sources` lists sources that share a
    recording or a talker and must stay together. Vocoded twins from `twins` (when that folder exists)
    are paired with their originals in `twin_fraction` of each batch's human/AI pairs."""

    seed: int = 0
    split_by: SplitBy = "source"
    linked_sources: tuple[tuple[str, ...], ...] = ()
    twins: str = Field("data/twins", description="folder of vocoded twins (aivoice twins); '' for none")
    twin_fraction: float = Field(0.5, ge=0, le=1)
    matched_fraction: float = Field(0.0, ge=0, le=1, description="share of the other human/AI pairs drawn from one "
                                    "training source that holds both labels (a page's human and its AI), through "
                                    "one channel: pairs the recording chain cannot tell apart")
    trim_silence_db: float = Field(40.0, ge=0, description="training crops stay inside the clip's voiced region: "
                                   "frames this many dB below its loudest frame at either end are cut (0 = off)")
    epochs: int = Field(12, gt=0)
    steps_per_epoch: int = Field(40, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    patience: int = Field(4, gt=0, description="epochs without a better validation EER before stopping")
    select: Literal["best", "last", "swa"] = Field(
        "last", description="the model kept: the last epoch of the full schedule, the epoch of best validation EER "
        "(early stopping), or swa: the mean of the weights over the schedule's tail (no early stop)")
    swa_start: float = Field(0.5, gt=0, lt=1, description="select swa: the share of the schedule after which the "
                             "weights are averaged, every step")
    mixture_fraction: float = Field(0.15, ge=0, lt=1, description="share of synthesized two-talker mixtures")
    ai_loss: Literal["ce", "ocsoftmax"] = Field(
        "ce", description="the ai head's loss: ce (cross-entropy on the linear ai head, production's) or ocsoftmax "
        "(one-class softmax on the embedding, Zhang et al. 2021: humans near one learned direction, AI kept away "
        "from it; the model then scores by that direction, saved as its cosine head)")
    chain_adversary: float = Field(
        0.0, ge=0, description="strength of the recording-chain adversary's reversed gradient into the trunk "
        "(pipeline/training/chain_adversary.py; 0 = off): a classifier of the training sources of the human clips "
        "and their twins, which the trunk learns to defeat")
    augment: AugmentConfig = AugmentConfig(
        noise_prob=0.3, noise_base_level=0.2, stretch_prob=0.3, codec_prob=0.2, band_limit_prob=0.3,
        pitch_shift_prob=0.3, spec_augment_prob=0.5)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast in training on a CUDA GPU")
    cpu_amp: bool = Field(False, description="bf16 autocast in training on a CPU with native bf16 (AVX512-BF16 / AMX; "
                          "float32 elsewhere): faster, and slightly worse leave-sources-out (docs/benchmarks.md 5n)")
    channels_last: bool = Field(True, description="channels_last weights and inputs in training (always with bf16 "
                                "and on CUDA): the layout the CPU's convolution kernels run fastest in")
    gpu_batch_size: int = Field(128, gt=0, description="batch size when training on a GPU (bf16, channels_last)")
    compile: bool = Field(False, description="torch.compile the model for training on CUDA (ignored on CPU; "
                          "untested on a GPU so far)")
    out: str = "models/base.pt"
    report: str = "reports/bootstrap.json"


class TwinsConfig(Section):
    """Vocoded twins of every human training clip (pipeline.synthesis): which vocoders, and the small
    neural decoders' training budget (step-bounded; the wall-clock cap protects a slow machine)."""

    out: str = "data/twins"
    report: str = "reports/twins.json"
    vocoders: tuple[Literal["griffinlim", "world", "lpc", "codec2", "istft", "hifigan"], ...] = (
        "griffinlim", "world", "lpc", "codec2", "istft")
    codec2_mode: Literal["3200", "2400", "1600", "1400", "1300", "1200", "700C"] = "1300"
    neural_steps: int = Field(600, gt=0)
    neural_batch_size: int = Field(8, gt=0)
    neural_lr: float = Field(5e-4, gt=0)
    neural_max_minutes: float = Field(10.0, gt=0)
    seed: int = 0


class IngestConfig(Section):
    """Versioned store: where accepted and rejected audio go, and what is accepted."""

    incoming: str = "data/incoming"
    store: str = "data/store"
    quarantine: str = "data/quarantine"
    report: str = "reports/ingest.json"
    min_sample_rate: int = Field(8000, gt=0)
    max_duration_s: float = Field(600.0, gt=0)
    test_fraction: float = Field(0.25, ge=0, lt=1, description="share of files (or speakers) held out for validation")
    split_by: Literal["file", "speaker"] = Field("file", description="speaker: needs many speakers per class")
    quarantine_max_mb: float = Field(500.0, ge=0, description="rejected files are copied to quarantine while the "
                                     "folder stays under this size; past it they are only listed in the report")


class AugmentStageConfig(Section):
    """Which stored clips get the production recipe's augmented copies."""

    new_generators: tuple[str, ...] = Field((), description="empty: the AI generators of the latest ingest batch")
    out: str = "data/augmented"


class FinetuneConfig(Section):
    """Fine-tuning the production model on new samples plus a replay set (pipeline.training.finetune).

    recipe: prototype | ocsoftmax (a cosine head, no trunk change), head (the ai head), last_block
    (the ai head's own copy of layer4 + ai head), input_layers (stem + layer1). Humans of the store's
    train split are divided by speaker into replay and early stopping (val_fraction). The threshold is
    calibrated on the test split's humans: on all of them, with the gates judging its human FPR cross-
    fitted over calibration_folds speaker-disjoint parts; or (calibration_folds 0) on a speaker-disjoint
    part (calibration_fraction), with the gates judging the rest."""

    base_model: str = "models/production.pt"
    out: str = "models/candidate.pt"
    report: str = "reports/finetune.json"
    recipe: Literal["prototype", "ocsoftmax", "head", "last_block", "input_layers"] = "last_block"
    epochs: int = Field(50, gt=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(64, gt=0)
    replay_per_class: int = Field(200, gt=0, description="segments of stored human (and earlier AI) speech per class")
    replay_twins: bool = Field(True, description="the vocoded twins (twins.out) of the replay humans join the earlier-AI "
                               "replay, as the base saw them")
    new_share: float = Field(0.5, gt=0, le=1, description="share of the AI class's loss weight on the new samples "
                             "(the rest on earlier AI replay)")
    distill_weight: float = Field(3.0, ge=0, description="recipes that change the trunk: weight of the loss that keeps "
                                  "the language and speakers heads' outputs as production's")
    distill_ai: float = Field(3.0, ge=0, description="recipes that change the trunk: weight of the loss that keeps the ai "
                              "head's output on the replay (humans, earlier AI) as production's")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="train-split humans (by speaker, and copies) for early stopping")
    calibration_folds: int = Field(5, ge=0, description="the threshold is calibrated on all test-split humans and the "
                                   "gates judge its human FPR cross-fitted over this many speaker-disjoint parts (fewer, "
                                   "down to 2, when the speakers cannot fill them); 0: calibrated on calibration_fraction "
                                   "of them, the gates judge the rest")
    calibration_fraction: float = Field(0.4, gt=0, lt=1, description="calibration_folds 0: test-split humans (by "
                                        "speaker) for threshold calibration; never trained on by production or the candidate")
    patience: int = Field(3, gt=0, description="epochs without a better early-stopping EER before stopping")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if self.calibration_folds == 1:
            raise ValueError("calibration_folds must be 0 (a held-out part) or >= 2 (cross-fitted)")
        return self


class GatesConfig(Section):
    """Pass/fail rules for a candidate against the production model.

    Below the evidence minimums the verdict is `insufficient evidence`, never passed. Every rate comes
    with its 95 % Wilson interval; the rates named in `pessimistic` are gated on the interval's
    pessimistic end (a human FPR's upper bound). New-generator recall is gated on its point estimate
    by default: with two new files its interval is [0.34, 1] whatever the model does."""

    min_new_recall: float = Field(0.9, ge=0, le=1)
    max_human_fpr: float = Field(0.05, ge=0, le=1)
    compare_at_fpr: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = Field(
        (0.01, 0.05, 0.10), min_length=1,
        description="the human FPRs (on the test humans) at which candidate and production are compared, both at one")
    max_recall_drop: float = Field(0.05, ge=0, le=1, description="recall on earlier AI generators at each compare_at_fpr "
                                   "may fall this much below production's (no forgetting)")
    max_eer_increase: float | None = Field(None, ge=0, le=1, description="null: the EER is reported, not gated (each model's "
                                           "EER sits at its own human FPR); a number gates the candidate's EER on "
                                           "production's plus this much")
    eer_step_floor: bool = Field(True, description="a gated EER's tolerance is at least one clip of the test split's "
                                 "smaller class: the EER moves in steps of about 1/n, and a smaller tolerance refuses on one clip")
    frozen_heads_unchanged: bool = True
    max_head_accuracy_drop: float = Field(0.01, ge=0, le=1, description="language and speakers accuracy on held-out "
                                          "clips may fall this much below production's (they move when the trunk trains)")
    min_new_files: int = Field(2, ge=1, description="new-generator files held out one at a time; fewer: insufficient evidence")
    min_calibration_humans: int = Field(50, ge=1, description="humans the threshold was calibrated on; fewer: insufficient evidence")
    pessimistic: tuple[Literal["human_fpr", "new_recall"], ...] = ("human_fpr",)
    max_tries_per_split: int = Field(3, ge=0, description="candidates judged on the same gate data before it must be "
                                     "refreshed (0 = no limit); retries that tune against the gates are counted")
    operating_points: tuple[float, ...] = (0.01, 0.05, 0.10)

    @field_validator("compare_at_fpr", mode="before")
    @classmethod
    def _one_or_more(cls, v):   # params written before it took a list: compare_at_fpr: 0.05
        return (v,) if isinstance(v, (int, float)) else v


class ValidateConfig(Section):
    """Where the verdict, metrics and plots go, and the gates."""

    metrics: str = Field("reports/metrics.json", description="summary numbers (DVC metrics)")
    tables: str = Field("reports/tables.json", description="per-generator and per-source tables of both models")
    verdict: str = "reports/verdict.json"
    plots: str = "reports/plots"
    report: str = Field("reports/report.html", description="the registered version's report (its PNGs go to plots)")
    gates: GatesConfig = GatesConfig()


class StorageConfig(Section):
    """Disk guard and retention (pipeline.io.disk)."""

    min_free_gb: float = Field(2.0, ge=0, description="ingest, twins, augment, finetune and bootstrap refuse to start "
                               "with less free disk where they write (0 = no check)")
    keep_candidates: int = Field(5, ge=0, description="`aivoice gc` keeps the local checkpoint copies of this many "
                                 "newest versions without an alias (aliased versions are always kept)")
    archive_dir: str | None = Field("archive", description="`aivoice gc` moves the MLflow artifacts of refused "
                                    "candidates beyond keep_candidates into checked tarballs here (`aivoice restore "
                                    "VERSION` puts them back); null leaves them in MLflow")


class RegistryConfig(Section):
    """MLflow Model Registry: the registered model, the experiment of training runs, promotion mode."""

    model_name: str = "ai-voice-detector"
    experiment: str = "ai-voice-detector"
    promotion: Literal["auto", "manual"] = Field("manual", description="auto: promote a challenger when its gates pass")
    ui_promotion: Literal["warn", "revert"] = Field("revert", description="a champion moved outside aivoice (MLflow "
                                                    "UI) to a version that has not passed its gates: revert puts the "
                                                    "validated champion back, warn records it as forced")


class ServeConfig(Section):
    """`aivoice serve`: bind address, input limits, how often `champion` is re-checked, inference device."""

    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    max_upload_mb: float = Field(50.0, gt=0, description="request bodies are cut off past this, with or without Content-Length")
    max_duration_s: float = Field(600.0, gt=0, description="decoded duration of one upload (50 MB of Opus is hours)")
    max_concurrent: int = Field(4, gt=0, description="requests to /detect at once; more get 503 + Retry-After")
    request_timeout_s: float = Field(30.0, gt=0, description="a request body not complete this long after the request "
                                     "began gets 408 (a slow client cannot hold a concurrency slot)")
    refresh_s: float = Field(5.0, gt=0)
    device: str = "cpu"


Threads = Annotated[Literal["auto"] | int, PlainValidator(_auto_or_count(1))]


class ComputeConfig(Section):
    """CPU use of every entry point (DVC stages, CLI, flows, serve); apply_threads() applies it.

    threads: torch's intra-op threads. `auto`: 1 when the host has <= 2 CPU cores or its 1-minute load
    average is >= its core count (torch's default, one thread per core, collapses 2-20x when the cores
    are shared: docs/benchmarks.md), else torch's default; or a fixed number >= 1.

    batch_workers: processes that make the next training batches (crops, augmentation) while the model
    trains on this one (bootstrap, evaluate), or that share fine-tuning's independent jobs (the replay's
    augmentation, the frozen caches, the leave-one-file-out trainings). Each batch is a function of
    (train.seed, step), each job of its seed, so the model is the same for any number. `auto`: where the
    host has 2 cores per training process, 2 batch makers for the base trainer (bootstrap and evaluate's fold
    models: its batch takes longer to make than the model's step, docs/benchmarks.md 5n) and 1 worker for fine-tuning's jobs and the twins; else 0."""

    threads: Threads = "auto"
    batch_workers: Workers = "auto"


class Params(Section):
    """Everything in params.yaml."""

    audio: AudioConfig = AudioConfig()
    features: FeatureConfig = FeatureConfig()
    model: ModelConfig = ModelConfig()
    detect: DetectConfig = DetectConfig()
    train: TrainConfig = TrainConfig()
    ingest: IngestConfig = IngestConfig()
    twins: TwinsConfig = TwinsConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    augment: AugmentConfig = AugmentConfig()
    augment_stage: AugmentStageConfig = AugmentStageConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    validation: ValidateConfig = Field(ValidateConfig(), alias="validate")  # `validate` in params.yaml
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    compute: ComputeConfig = ComputeConfig()
    storage: StorageConfig = StorageConfig()


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or holds a wrong key or value."""


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict | None = None) -> Params:
    """Read and validate params.yaml; a missing file means the defaults. Errors name the key."""
    path = Path(path)
    raw: dict = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"{path}: not valid YAML ({exc})") from None
    for dotted, value in (overrides or {}).items():   # "section.key" or deeper, e.g. "train.augment.lowpass"
        *parents, key = dotted.split(".")
        node = raw
        for name in parents:
            node = node.setdefault(name, {})
        node[key] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]).replace("validation", "validate", 1)
        raise ParamsError(f"{path}: {key}: {first['msg']}") from None


# how fast, how long or where, not what is computed: changing these leaves a model's params_hash alone
_NOT_HASHED = {"compute": True, "storage": True, "audio": {"decode_timeout_s"}, "detect": {"workers"}}


def params_hash(params: BaseModel) -> str:
    """Stable short hash of a settings object, recorded with every model (the `compute` section left out)."""
    dumped = params.model_dump(mode="json", exclude=_NOT_HASHED if isinstance(params, Params) else None)
    blob = json.dumps(dumped, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_torch_default_threads: int | None = None   # torch's own choice, read before the first change
_logged_threads: int | None = None


def auto_threads() -> int | None:
    """What `compute.threads: auto` asks for on this host: 1 when it has <= 2 CPU cores (os.cpu_count())
    or its 1-minute load average is >= that count, else None (torch's default)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform: judge by the cores alone
        load = 0.0
    return 1 if cores <= 2 or load >= cores else None


def batch_workers(params: Params, processes: int = 1, auto: int = 1) -> int:
    """How many batch-making processes each of `processes` training processes gets (compute.batch_workers):
    `auto` of them when the host has 2 cores per training process, else none."""
    setting = params.compute.batch_workers
    if setting != "auto":
        return setting
    return auto if (os.cpu_count() or 1) >= 2 * processes else 0


def apply_threads(params: Params) -> int:
    """Set torch's intra-op threads from `compute.threads` (torch.set_num_threads); returns the number
    used. Every entry point calls it once after reading params; the choice is logged once at INFO."""
    import torch  # here, not at module level: reading settings must not load torch

    global _torch_default_threads, _logged_threads
    if _torch_default_threads is None:
        _torch_default_threads = torch.get_num_threads()
    setting = params.compute.threads
    wanted = auto_threads() if setting == "auto" else setting
    threads = wanted if wanted is not None else _torch_default_threads
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if threads != _logged_threads:
        _logged_threads = threads
        log.info("torch intra-op threads: %d (compute.threads: %s; %s CPU cores)", threads, setting, os.cpu_count())
    return threads
