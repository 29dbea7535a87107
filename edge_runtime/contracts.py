"""The contracts that the cloud and the device share, in one place.

Every document that crosses the cloud/device boundary is one of these typed, versioned models:
the model bundle manifest, the runtime configuration and the window summary. A reader refuses a
document whose ``schema_version`` it does not know instead of guessing at its meaning.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator

MANIFEST_SCHEMA_VERSION = 1
CONFIG_SCHEMA_VERSION = 2
SUMMARY_SCHEMA_VERSION = 4

MAX_WINDOW_SECONDS = 7 * 86400  # the largest window: a week of one device's data in one summary


class ContractError(ValueError):
    """A shared document is missing, malformed or of an unknown version."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


# --- model bundle manifest -------------------------------------------------------------------


class FeatureSpec(_Strict):
    """One input column of the model, in the order the model expects it."""

    name: str
    dtype: Literal["float32"] = "float32"
    missing: Literal["reject", "impute"] = "reject"
    impute_value: float | None = None


class InputSchema(_Strict):
    name: str = Field(description="the ONNX graph input that takes the feature matrix")
    dtype: Literal["float32"] = "float32"
    shape: list[int | None] = Field(description="[None, n_features]: any batch size")
    features: list[FeatureSpec]

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]


class OutputSpec(_Strict):
    name: str = Field(description="the ONNX graph output that holds one value per row")
    meaning: str
    higher_is_outlier: bool = Field(
        description="False when the output is a likelihood: the runtime negates it so that "
        "the outlier score always grows with how unusual a row is"
    )


class OutlierRule(_Strict):
    kind: Literal["score_above_threshold"] = "score_above_threshold"
    threshold: float
    target_false_positive_rate: float
    calibration_rows: int


class ModelVariant(_Strict):
    """Another build of the same model (e.g. fp16 for GPU providers), gated against the fp32 one."""

    file: str
    precision: Literal["fp16", "int8"]
    providers: list[str] = Field(description="execution providers this variant is meant for")
    parity: dict[str, float] = Field(
        default_factory=dict,
        description="what its gate measured against the fp32 model on held-out rows, e.g. max_abs_diff, "
        "decision_agreement",
    )


class SkippedVariant(_Strict):
    """A variant that failed its parity gate (or could not be built): left out, and why."""

    precision: Literal["fp16", "int8"]
    reason: str
    parity: dict[str, float] = Field(default_factory=dict)


class NeoArtifact(_Strict):
    """A SageMaker Neo compilation of the model for one target device or platform."""

    target: str = Field(description="Neo's TargetDevice (e.g. jetson_xavier) or os_arch[_accelerator]")
    directory: str = Field(description="bundle-relative folder holding Neo's output, unpacked")
    job_name: str
    framework: str = "ONNX"


class StreamSpec(_Strict):
    """A stream model reads the last ``window`` values of one stream, not one record: the device keeps
    each stream's recent values (keyed by the record's ``key`` field) and feeds the model that window."""

    key: str = Field("stream_id", description="the record field naming the stream; records without it "
                     "belong to one default stream")
    value: str = Field(description="the input feature holding the stream's value")
    window: int = Field(gt=1, le=4096, description="values per model row, oldest first, the newest last")
    max_streams: int = Field(10_000, gt=0, le=1_000_000,
                             description="streams kept; the one unseen longest is forgotten beyond this")
    warmup: int = Field(64, ge=0, le=4095, description="a stream's first values (after a start or once "
                        "forgotten) are scored and summarised but not flagged: too few to judge a range by")


class BundleManifest(_Strict):
    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    created_at: datetime
    model_file: str
    baseline_file: str
    files: dict[str, str] = Field(description="relative path -> sha256 hex of every bundle file")
    input: InputSchema
    output: OutputSpec
    outlier: OutlierRule
    onnx_opset: int
    optimization: str = Field(description="the ONNX Runtime offline optimisation applied")
    gpu_capable: bool = Field(description="no operator in the graph is CPU-provider-only")
    variants: dict[str, ModelVariant] = Field(default_factory=dict)
    skipped_variants: dict[str, SkippedVariant] = Field(default_factory=dict)
    neo: dict[str, NeoArtifact] = Field(default_factory=dict, description="by Neo target")
    stream: StreamSpec | None = Field(None, description="set for stream models: the input is a window")
    lineage: dict = Field(default_factory=dict, description="where the model came from: training job, "
                          "image, hyperparameters, metrics, data location and checksum")


# --- window summary ---------------------------------------------------------------------------


class NumericSummary(_Strict):
    """Mergeable statistics of one numeric series over a window."""

    count: int = Field(0, description="finite values summarised")
    missing: int = Field(0, description="records without this value")
    nonfinite: int = Field(0, description="NaN or infinite values (nan + inf from version 3 on)")
    nan: int = 0
    inf: int = 0
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    variance: float | None = Field(default=None, description="population variance (M2 / count)")
    hist_edges: list[float] = Field(default_factory=list)
    hist_counts: list[int] = Field(
        default_factory=list,
        description="len(hist_edges)+1 counts: below the first edge, between edges, above the last",
    )
    kll: bytes | None = Field(default=None, description="a serialised DataSketches KLL sketch (base64 in JSON)")
    kll_type: Literal["f64", "f32"] = Field(
        "f64", description="f64: kll_doubles_sketch (versions 1 and 2); f32: kll_floats_sketch (version 3)"
    )
    grid_counts: list[int] | None = Field(
        None, description="version 4: exact counts on the review grid (``summary.review_grid`` of the baseline, "
        "named by the summary's ``grid``): per point, the values in (previous point, point]; the values above "
        "the last point are count less their sum",
    )

    @field_validator("kll", mode="before")
    @classmethod
    def _kll_from_base64(cls, v: object) -> object:
        if isinstance(v, str):
            import base64
            import binascii

            try:
                return base64.b64decode(v, validate=True)
            except binascii.Error:
                raise ValueError("not base64") from None
        return v

    @field_serializer("kll", when_used="json")
    def _kll_to_base64(self, v: bytes | None) -> str | None:
        import base64

        return None if v is None else base64.b64encode(v).decode("ascii")


class SpoolDrops(_Strict):
    """Objects the device's spool dropped (full, or too old) since the previous summary was written."""

    summaries: int = 0
    samples: int = 0
    records: int = Field(0, description="records counted in the dropped summaries")
    reason: str | None = Field(None, description="why, for the most recent drop")


class WindowHealth(_Strict):
    """The device service's health when the window closed (cumulative since the service started)."""

    provider: str
    uptime_s: float
    records_in: int
    scored: int
    rejected: int
    outliers: int
    dropped: int = Field(description="records dropped by the intake queue's drop_oldest policy")
    queue_depth: int
    batches: int
    batch_size_p50: float | None = None
    score_latency_ms_p50: float | None = None
    score_latency_ms_p99: float | None = None
    swaps: int = 0
    spool_pending: int | None = Field(None, description="objects waiting in the spool for the store")
    spool_bytes: int | None = None
    disk_full: bool = Field(False, description="the spool could not write for lack of space; objects kept in memory")
    uploaded: int | None = None
    upload_failures: int | None = None
    writer_conflicts: int = Field(0, description="other runtimes seen writing as this device id")
    replays: int = Field(0, description="window parts not written because they repeated one already written")
    lines_lost: int = Field(0, description="event and dead-letter lines that could not be written (disk full)")
    events_published: int = Field(0, description="events and heartbeats the broker acknowledged (publish)")
    events_dropped: int = Field(0, description="events dropped by a full publish queue while the broker was away")


class SummaryHeader(_Strict):
    """A window summary without its series: what the fleet review needs to admit a summary
    before it reads the series' columns (``summary_format.columns``)."""

    schema_version: Literal[1, 2, 3, 4] = SUMMARY_SCHEMA_VERSION
    model_name: str
    model_version: str
    device_id: str
    instance_id: str | None = Field(None, description="the runtime process that wrote it (version 3)")
    part: int = Field(0, ge=0, description="0, 1, ...: further parts of the same window by the same instance")
    window_start: datetime
    window_end: datetime
    records: int = Field(0, description="records scored")
    rejected: int = Field(0, description="records dead-lettered")
    late: int = Field(0, description="records older than the window they were counted in")
    outliers: int = 0
    rejected_by_reason: dict[str, int] = Field(default_factory=dict)
    dropped: int = Field(0, description="records the intake queue dropped while this window was open")
    records_digest: str | None = Field(
        None, description="order-independent digest of the records counted (scored and rejected): "
        "two parts of one window with the same digest and counts are one input replayed",
    )
    spool_dropped: SpoolDrops | None = None
    health: WindowHealth | None = None
    grid: str | None = Field(
        None, description="version 4: the review grids its series' grid_counts are on (``summary.grid_id``)",
    )

    @property
    def identity(self) -> tuple:
        """What a replay of the same input repeats exactly."""
        return (self.model_name, self.model_version, self.device_id, self.window_start, self.records_digest,
                self.records, self.rejected)


class WindowSummary(SummaryHeader):
    """Versions 1 and 2 (JSON) are still read; version 3 is written in the binary container of
    ``summary_format`` and adds the writer's instance id, the part number, a digest of the
    records counted, and the spool's drops; version 4 adds exact counts on the review grid."""

    features: dict[str, NumericSummary]
    score: NumericSummary


# --- runtime configuration --------------------------------------------------------------------


class MqttConnection(_Strict):
    """An MQTT broker: AWS IoT Core's endpoint (8883, mutual TLS with the device certificate), or any."""

    client: Literal["paho", "awsiotsdk"] = Field(
        "paho", description="paho-mqtt (MQTT 3.1.1), or the AWS SDK's MQTT5 client (awscrt)"
    )
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535, description="8883 for TLS, as AWS IoT Core")
    client_id: str | None = Field(None, description="default: edgeloop-<device_id> (with -pub for publishing)")
    persistent_session: bool = Field(
        True, description="the broker keeps QoS 1 messages for us while we are away (clean_session false)"
    )
    ca_file: str | None = Field(None, description="TLS: the CA that signed the broker's certificate")
    cert_file: str | None = Field(None, description="mutual TLS: this device's certificate")
    key_file: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_max_s: float = Field(60.0, gt=0, le=3600, description="backoff from 1 s, doubling, with jitter")


class MqttConfig(MqttConnection):
    """Records from a broker's topics."""

    topics: list[str] = Field(default_factory=lambda: ["edgeloop/records"], min_length=1)
    qos: Literal[0, 1] = Field(1, description="1: a record is acknowledged only once the service has it")


class PublishConfig(_Strict):
    """Where outlier events and a health heartbeat go besides the local events file."""

    kind: Literal["none", "mqtt", "ipc"] | None = Field(
        None, description="ipc: PublishToIoTCore through the Greengrass nucleus; mqtt: a broker of our own; "
        "default: ipc under Greengrass, else none",
    )
    mqtt: MqttConnection = Field(default_factory=MqttConnection)
    events_topic: str = Field("edgeloop/{device_id}/outliers", description="{device_id} is filled in")
    health_topic: str = Field("edgeloop/{device_id}/health")
    heartbeat_s: float = Field(60.0, ge=0, description="the health counters this often; 0: never")
    qos: Literal[0, 1] = 1
    max_queue: int = Field(10_000, gt=0, le=1_000_000, description="events held while the broker is away")
    when_full: Literal["drop_oldest", "drop_new"] = Field(
        "drop_oldest", description="which events go when the queue is full; drops are counted in health"
    )
    also_local: bool = Field(False, description="ipc: also publish events to local publish/subscribe")
    max_payload_bytes: int = Field(
        128 * 1024, ge=256, le=128 * 1024,
        description="AWS IoT Core's limit: a larger event is published as a reference to its outlier sample",
    )


class IpcSourceConfig(_Strict):
    """Records through the Greengrass nucleus (IPC): local publish/subscribe or AWS IoT Core."""

    via: Literal["local", "iot_core"] = Field("local", description="SubscribeToTopic or SubscribeToIoTCore")
    topics: list[str] = Field(default_factory=lambda: ["edgeloop/{device_id}/records"], min_length=1,
                              description="{device_id} is filled in")
    qos: Literal[0, 1] = Field(1, description="iot_core: the subscription's QoS")


class SourceConfig(_Strict):
    """Where records come from. ``kind`` defaults to ``stdin`` for path '-', else ``file``."""

    kind: Literal["file", "stdin", "tail", "tcp", "unix", "mqtt", "ipc"] | None = None
    path: str = Field("-", description="file, tailed file or Unix socket path; '-' is standard input")
    host: str = Field("127.0.0.1", description="tcp: the address to listen on")
    port: int = Field(0, ge=0, le=65535, description="tcp: the port (0 picks a free one)")
    format: Literal["jsonl", "frames"] = "jsonl"
    max_message_bytes: int = Field(
        1 << 20, ge=256, le=64 << 20,
        description="the largest JSON line or binary frame; longer ones are dead-lettered unread",
    )
    from_start: bool = Field(False, description="tail: read what the file already holds first")
    poll_ms: int = Field(200, gt=0, le=60_000, description="tail: how often to look for new data")
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    ipc: IpcSourceConfig = Field(default_factory=IpcSourceConfig)
    parse_workers: int = Field(
        0, ge=0, le=64,
        description="JSON lines: processes that parse ahead of the engine, so a second core decodes while the "
        "first scores; 0 parses on the engine's thread",
    )

    @property
    def resolved_kind(self) -> str:
        return self.kind or ("stdin" if self.path == "-" else "file")


class QueueConfig(_Strict):
    max_records: int = Field(65_536, gt=0, le=10_000_000)
    when_full: Literal["block", "drop_oldest"] = Field(
        "block", description="block: the source waits (back-pressure); drop_oldest: drop and count"
    )


class BatchConfig(_Strict):
    max_records: int = Field(256, gt=0, le=65_536)
    max_wait_ms: float = Field(
        0.0, ge=0, le=10_000,
        description="how long a record may wait for its batch to fill; 0: an idle engine scores at once",
    )


class WindowConfig(_Strict):
    seconds: int = Field(3600, gt=0, le=MAX_WINDOW_SECONDS)
    lateness_s: float = Field(
        5.0, ge=0, le=86_400,
        description="how long after its end (in stream time, advancing with the wall clock) a quiet "
        "stream's window stays open for late records; a record of a later window still closes it at once",
    )
    max_future_s: float = Field(
        86_400, ge=0, description="records stamped further ahead of the device clock are dead-lettered"
    )
    max_past_s: float | None = Field(
        10 * 365 * 86_400, ge=0,
        description="records stamped further behind the device clock are dead-lettered; null: back to 1970",
    )
    checkpoint_s: float = Field(
        30.0, ge=0, le=86_400,
        description="write the open window's state to the spool this often, so a kill loses at most this much; "
        "0: never",
    )
    kll_k: int = Field(200, ge=8, le=65_535, description="KLL sketch size: rank error about 1.33% at 200")


class ProviderSpec(_Strict):
    name: str
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)


class ScoringConfig(_Strict):
    providers: list[str | ProviderSpec] = Field(
        default_factory=lambda: ["auto"],
        description="ONNX Runtime execution providers in order of preference, each a name or "
        "{name, options}; 'auto' is CUDA then CPU",
    )
    intra_op_threads: int = Field(
        1, ge=0, le=256, description="ONNX Runtime intra-op threads (0: its default, one per core)"
    )
    io_binding: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: bind inputs and outputs on GPU providers only"
    )
    threshold: float | None = Field(
        None, description="the outlier score threshold, instead of the bundle's calibrated one (applies live)"
    )


class HealthConfig(_Strict):
    port: int | None = Field(None, ge=0, le=65535, description="Prometheus text format on this port; off if null")
    address: str = "127.0.0.1"
    log_interval_s: float = Field(60.0, ge=0, description="one health line in the log this often; 0: never")


class ServiceConfig(_Strict):
    grace_s: float = Field(20.0, gt=0, le=600, description="SIGTERM/SIGINT: drain and exit within this")
    watch_config_s: float = Field(
        0.0, ge=0, description="re-read the config file this often and hot-swap a changed bundle; 0: SIGHUP only"
    )


class SinksConfig(_Strict):
    events: str = "events.jsonl"
    dead_letter: str = "dead-letter.jsonl"
    outbox: str = "outbox"
    max_outlier_samples: int = Field(1000, ge=0, description="per window, synced to the store")


class SpoolConfig(_Strict):
    """The local spool (``sinks.outbox``) between the engine and the store, bounded like a Stream
    Manager stream: a declared policy when it is full."""

    max_bytes: int = Field(256 << 20, ge=1 << 16, description="the most the spool holds on disk")
    max_age_s: float | None = Field(
        14 * 86_400, gt=0, description="objects older than this are dropped unsent (counted); null: kept"
    )
    when_full: Literal["drop_oldest", "reject_new"] = Field(
        "drop_oldest",
        description="drop_oldest: drop the oldest outlier samples, then the oldest summaries; reject_new: drop "
        "the new object. Every drop is counted in the next summary's header",
    )
    max_memory_bytes: int = Field(
        16 << 20, ge=0, description="disk full: objects kept in memory up to this, sent from there if the link is up"
    )


class StoreConfig(_Strict):
    url: str = Field("store", description="a local directory, or s3://bucket/prefix")
    endpoint_url: str | None = None
    sse: Literal["AES256", "aws:kms"] | None = Field(None, description="server-side encryption of every object")
    kms_key_id: str | None = Field(None, description="with sse aws:kms: the key (default: the bucket's)")
    multipart_threshold_mb: int = Field(16, ge=5, le=5 * 1024, description="larger objects go in parts")
    connect_timeout_s: float = Field(3.0, gt=0, le=120)
    read_timeout_s: float = Field(10.0, gt=0, le=600, description="per request: a hung store fails fast")
    retry_max_s: float = Field(
        60.0, gt=0, le=3600, description="the longest wait between upload attempts while the store fails "
        "(exponential backoff with jitter from 1 s)",
    )
    upload_cpu_share: float = Field(
        0.1, gt=0, le=1, description="the most of one core the uploader's Python work may take while draining "
        "a backlog (it pauses between objects), so scoring keeps its pace; 1: no pauses",
    )
    presence_s: float = Field(
        300.0, ge=0, description="how often the runtime says in the store that it writes as this device id (to "
        "detect two runtimes with one id); 0: never",
    )


class RuntimeConfig(_Strict):
    """Version 2 of the device configuration; a version-1 document is migrated on load."""

    schema_version: Literal[2] = CONFIG_SCHEMA_VERSION
    device_id: str = Field(min_length=1)
    bundle: str
    source: SourceConfig = Field(default_factory=SourceConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    window: WindowConfig = Field(default_factory=WindowConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    @field_validator("device_id")
    @classmethod
    def _no_slash(cls, v: str) -> str:
        if "/" in v or "=" in v:
            raise ValueError("must not contain '/' or '=' (it becomes part of a storage key)")
        return v


# --- loading ----------------------------------------------------------------------------------


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the first offending key, for people reading a terminal or a log."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<document>"
    if first["type"] == "missing":
        return f"{source}: missing key '{key}'"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    return f"{source}: key '{key}': {first['msg']}"


def parse_document(model: type[BaseModel], data: object, source: str):
    """Validate ``data`` as ``model``; raise ContractError with a one-line message."""
    if not isinstance(data, dict):
        raise ContractError(f"{source}: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ContractError(describe_validation_error(err, source)) from None


def load_runtime_config(path: str | Path | None, overrides: dict[str, str] | None = None,
                        extra: dict | None = None) -> RuntimeConfig:
    """Read an edge.yaml (YAML or JSON), or none, then merge ``extra`` (a mapping: the Greengrass
    component's ``runtime`` configuration) and apply dotted ``key=value`` overrides, in that order.

    Relative paths in a file are relative to that file; without a file, to the working directory.
    """
    import yaml

    data: object = {}
    source = "config"
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        source, base = str(path), path.parent
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ContractError(f"{path}: no such config file") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}:" if mark else ""
            raise ContractError(f"{path}:{where} not valid YAML") from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise ContractError(f"{source}: expected a mapping at the top level")
    data = migrate_config(data, source)
    if extra:
        data = _deep_merge(data, extra)
    for dotted, value in (overrides or {}).items():
        # values stay strings (a thing name like "007" must not become 7) unless they are YAML
        # flow collections, or null (to clear an optional key); pydantic turns "60" into an int where
        # the schema wants one
        text = value.strip()
        parsed = None if text in ("null", "~") else yaml.safe_load(value) if text[:1] in "[{" else value
        _set_dotted(data, dotted, parsed)
    return resolve_paths(parse_document(RuntimeConfig, data, source), base)


def migrate_config(data: dict, source: str) -> dict:
    """Version 1 (the skeleton's) had ``scoring.batch_size``; version 2 calls it ``batch.max_records``."""
    version = data.get("schema_version", CONFIG_SCHEMA_VERSION)
    if version == 1:
        data = {**data, "schema_version": CONFIG_SCHEMA_VERSION}
        scoring = data.get("scoring")
        if isinstance(scoring, dict) and "batch_size" in scoring:
            scoring = dict(scoring)
            data["batch"] = {**(data.get("batch") or {}), "max_records": scoring.pop("batch_size")}
            data["scoring"] = scoring
    elif version != CONFIG_SCHEMA_VERSION:
        raise ContractError(f"{source}: schema_version {version!r} is not one this runtime knows (1 or 2)")
    return data


def resolve_paths(config: RuntimeConfig, base: Path) -> RuntimeConfig:
    """Relative paths in a config file mean relative to that file, not to the working directory."""

    def rel(p: str) -> str:
        return p if p == "-" or "://" in p or Path(p).is_absolute() else str(base / p)

    config.bundle = rel(config.bundle)
    config.source.path = rel(config.source.path)
    for mqtt in (config.source.mqtt, config.publish.mqtt):
        mqtt.ca_file, mqtt.cert_file, mqtt.key_file = (None if p is None else rel(p)
                                                       for p in (mqtt.ca_file, mqtt.cert_file, mqtt.key_file))
    config.sinks.events = rel(config.sinks.events)
    config.sinks.dead_letter = rel(config.sinks.dead_letter)
    config.sinks.outbox = rel(config.sinks.outbox)
    config.store.url = rel(config.store.url)
    return config


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(data: dict, dotted: str, value: object) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ContractError(f"override {dotted}: '{part}' is not a mapping")
    node[leaf] = value


def load_json_file(model: type[BaseModel], path: str | Path, missing: str):
    """Read and validate a JSON document; ``missing`` says what its absence means."""

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ContractError(f"{path}: {missing}") from None
    except json.JSONDecodeError as err:
        raise ContractError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    return parse_document(model, data, str(path))


def load_manifest(path: str | Path) -> BundleManifest:
    return load_json_file(BundleManifest, path, "no manifest (is this a model bundle?)")


def load_summary(data: bytes | str, source: str) -> WindowSummary:
    """A window summary of any version: binary (3, 4) or JSON (1, 2; a baseline of any)."""

    if isinstance(data, bytes) and data[:4] == b"ELWS":
        from .summary_format import decode

        return decode(data, source)
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as err:
        raise ContractError(f"{source}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise ContractError(f"{source}: neither a binary summary nor JSON") from None
    return parse_document(WindowSummary, doc, source)


# --- object-store key layout ------------------------------------------------------------------

SUMMARY_PREFIX = "summaries/"
OUTLIER_PREFIX = "outliers/"
BASELINE_PREFIX = "baselines/"


def window_stamp(start: datetime) -> str:
    return start.strftime("%Y%m%dT%H%M%SZ")


def _partition(model: str, version: str, device: str, start: datetime) -> str:
    return f"model={model}/version={version}/device={device}/date={start:%Y-%m-%d}"


def _stamp(start: datetime, part: int, instance: str | None) -> str:
    if instance is not None:
        return f"{window_stamp(start)}-{instance}-p{part}"
    return window_stamp(start) + (f"-part{part}" if part else "")


SUMMARY_SUFFIX = ".elws"  # version 3, binary (``summary_format``); ".json" for versions 1 and 2


def summary_key(model: str, version: str, device: str, start: datetime, part: int = 0,
                instance: str | None = None) -> str:
    """summaries/model=<name>/version=<v>/device=<id>/date=<YYYY-MM-DD>/<window-start>-<instance>-p<part>.elws

    One key per (device, model version, window, writer instance, part): a retry writes the same key,
    two runtimes or two parts never do. Readers merge all parts of a window. Without ``instance``,
    the version-2 key (``<window-start>[-part<n>].json``).
    """
    suffix = SUMMARY_SUFFIX if instance is not None else ".json"
    return f"{SUMMARY_PREFIX}{_partition(model, version, device, start)}/{_stamp(start, part, instance)}{suffix}"


def outlier_key(model: str, version: str, device: str, start: datetime, part: int = 0,
                instance: str | None = None) -> str:
    """Outlier samples of one window part: gzip JSON lines (``.jsonl`` before version 3)."""
    suffix = ".jsonl.gz" if instance is not None else ".jsonl"
    return f"{OUTLIER_PREFIX}{_partition(model, version, device, start)}/{_stamp(start, part, instance)}{suffix}"


def presence_key(device: str, instance: str) -> str:
    """Where a runtime says it writes as ``device``: two live ones at once are a misconfiguration."""
    return f"devices/device={device}/writers/{instance}.json"


def baseline_key(model: str, version: str) -> str:
    return f"{BASELINE_PREFIX}model={model}/version={version}/baseline.json"


def model_key(model: str, version: str, filename: str) -> str:
    return f"models/model={model}/version={version}/{filename}"


# --- Greengrass: the runtime component's configuration ---------------------------------------
# The runtime component serves one model component, named in its configuration under ``model``;
# ``edgeloop deploy`` writes that mapping, the runtime reads it (and follows it live) over IPC.
# A model component is data only: one artifact, ``bundle.zip``, whose entries sit at the top, so
# the nucleus unzips it into ``<decompressed path>/bundle/``.

MODEL_COMPONENT_PREFIX = "com.edgeloop.model."
BUNDLE_ARTIFACT = "bundle.zip"
GREENGRASS_ROOT_ENV = "EDGELOOP_GREENGRASS_ROOT"  # set by the recipe to {kernel:rootPath}
SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"


class ModelComponentRef(_Strict):
    component: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="the model component's name")
    version: str = Field(pattern=SEMVER, description="the model component's version, exactly")


def model_component_name(model_name: str) -> str:
    return MODEL_COMPONENT_PREFIX + model_name


def model_bundle_dir(greengrass_root: str | Path, ref: ModelComponentRef) -> Path:
    """Where the nucleus unzipped a model component's bundle (``{artifacts:decompressedPath}/bundle``)."""
    return (Path(greengrass_root) / "packages" / "artifacts-unarchived" / ref.component / ref.version
            / BUNDLE_ARTIFACT.removesuffix(".zip"))


def runtime_settings(component_config: object, greengrass_root: str | None) -> dict:
    """The runtime configuration mapping in a runtime component's configuration: its ``runtime``
    mapping, with ``bundle`` pointing at the unzipped artifact of the model component it names."""
    if not isinstance(component_config, dict):
        raise ContractError("component configuration: expected a mapping")
    _check_interpolated(component_config.get("accessControl"))
    runtime = component_config.get("runtime") or {}
    if not isinstance(runtime, dict):
        raise ContractError("component configuration: 'runtime' must be a mapping")
    runtime = dict(runtime)
    model = component_config.get("model")
    if model in (None, {}, ""):
        return runtime
    ref = parse_document(ModelComponentRef, model, "component configuration 'model'")
    if not greengrass_root:
        raise ContractError(f"component configuration names model {ref.component} {ref.version}, but "
                            f"{GREENGRASS_ROOT_ENV} is not set (the recipe sets it to {{kernel:rootPath}})")
    path = model_bundle_dir(greengrass_root, ref)
    if not path.is_dir():
        raise ContractError(
            f"model component {ref.component} {ref.version} is not on this device (no {path}); "
            "deploy it together with the runtime, e.g. `edgeloop deploy --model-version "
            f"{ref.version}`")
    runtime["bundle"] = str(path)
    return runtime


def _check_interpolated(access_control: object) -> None:
    """Least-privilege policies name ``{iot:thingName}``; a nucleus that does not interpolate
    component configuration leaves it literal, and every IPC call would then be refused."""

    if access_control is not None and "{iot:thingName}" in json.dumps(access_control):
        raise ContractError(
            "the component's accessControl still reads {iot:thingName}: this nucleus does not interpolate "
            "component configuration. Set interpolateComponentConfiguration: true in the "
            "aws.greengrass.Nucleus configuration (v2.6.0 or later) and deploy again")
