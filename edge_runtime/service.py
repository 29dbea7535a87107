"""The device service: a source, the intake queue, the engine, the uploader and health, run
until stopped.

Threads: the source reads and cuts messages; the engine thread (the caller of ``run``) takes
batches from the queue and scores them; the uploader forwards the outbox; a model loader checks a
new bundle in the background; the metrics endpoint answers scrapes. Signals: SIGTERM and SIGINT
drain (stop reading, score what is queued, ship the open window as a part, one last upload,
exit within ``service.grace_s``; a second signal exits at once); SIGHUP re-reads the config file
and hot-swaps a changed bundle. A finite source (a file, stdin) ends the run at its end.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .batcher import IntakeQueue
from .bundle import BundleError, load_bundle
from .contracts import ContractError, RuntimeConfig, load_runtime_config
from .health import Health, serve_metrics
from .model import Model, load_model
from .runtime import EdgeRuntime, RunStats
from .scoring import ScoringError
from .sources import Source, open_source
from .store import ObjectStore

log = logging.getLogger(__name__)

TICK_S = 0.1  # the longest the engine waits for input before it looks at clocks and reloads


class Service:
    def __init__(
        self,
        config: RuntimeConfig,
        config_path: str | Path | None = None,
        overrides: dict[str, str] | None = None,
        input_path: str | None = None,
        store: ObjectStore | None = None,
        clock: Callable[[], float] = time.time,
        source: Source | None = None,
        nucleus=None,
    ) -> None:
        self.config = config
        self.nucleus = nucleus  # a greengrass.NucleusLink when the nucleus runs us
        self._follower = None
        self.input_path = input_path
        self._resolve_transports(config, input_path)
        self.config_path = config_path
        self.overrides = overrides or {}
        self.queue = IntakeQueue(config.queue.max_records, config.queue.when_full)
        self.health = Health(queue_depth=lambda: self.queue.depth, dropped=lambda: self.queue.dropped)
        bundle = load_bundle(config.bundle)
        self._parse = None
        # a stream bundle needs each record's stream name: it parses on the engine's thread
        if config.source.parse_workers and config.source.format == "jsonl" and bundle.manifest.stream is None:
            from .parsing import ParseStage

            # started before the model loads, so the workers' start overlaps the session's
            self._parse = ParseStage(self.queue.put, bundle.manifest.input, lambda: self.runtime.ts_range(),
                                     config.source.parse_workers)
        try:
            model = load_model(config.bundle, config.scoring, bundle=bundle, max_batch=config.batch.max_records)
            self.runtime = EdgeRuntime(config, store=store, clock=clock, model=model, health=self.health)
            self.publisher = None
            if config.publish.kind == "mqtt" and config.publish.mqtt.client == "awsiotsdk":
                from .mqtt5_sdk import SdkMqttPublisher

                self.publisher = SdkMqttPublisher(config.publish, config.device_id, self.health)
            elif config.publish.kind == "mqtt":
                from .mqtt import MqttPublisher

                self.publisher = MqttPublisher(config.publish, config.device_id, self.health)
            elif config.publish.kind == "ipc":
                from .greengrass import IpcPublisher

                self.publisher = IpcPublisher(config.publish, config.device_id, self.health, nucleus)
            if self.publisher is not None:
                self.runtime.event_hooks.append(self.publisher.event)
            if source is None and config.source.resolved_kind == "ipc" and input_path is None:
                from .greengrass import IpcSource

                source = IpcSource(config.source, config.device_id, nucleus)
            self.source = source or open_source(config.source, config.batch.max_records, input_path,
                                                client_id=f"edgeloop-{config.device_id}")
        except BaseException:  # a start that fails leaves no worker processes behind
            if self._parse is not None:
                self._parse.close()
            raise
        self.stopping = threading.Event()  # sources stop reading
        self._stop_at: float | None = None
        self._reload = threading.Event()
        self._loading: threading.Thread | None = None
        self._ready: Model | None = None
        self._bundle_files = model.bundle.manifest.files
        self._bundle_path = str(config.bundle)
        self._config_mtime = self._mtime()
        self._loaded = config  # the config as last read, to say once what a reload cannot apply
        self._config_checked = time.monotonic()
        self._source_done = threading.Event()
        self.metrics_port: int | None = None
        self._metrics = None
        self.started = threading.Event()

    def _resolve_transports(self, config: RuntimeConfig, input_path: str | None) -> None:
        """Under Greengrass the nucleus is the default transport both ways; off it, IPC is an error."""
        if self.nucleus is not None:
            if config.source.kind is None and input_path is None:
                config.source.kind = "ipc"
            if config.publish.kind is None:
                config.publish.kind = "ipc"
        elif config.publish.kind is None:
            config.publish.kind = "none"
        uses_ipc = (config.source.resolved_kind == "ipc" and input_path is None) or config.publish.kind == "ipc"
        if uses_ipc and self.nucleus is None:
            raise ContractError("source.kind/publish.kind 'ipc' needs the Greengrass nucleus, and this process was "
                                "not started by one (no AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT)")

    # -- control, from any thread or a signal handler --------------------------------------------

    def request_stop(self) -> None:
        if self._stop_at is None:
            self._stop_at = time.monotonic()
            self.stopping.set()

    def request_reload(self) -> None:
        self._reload.set()

    def request_swap(self, bundle_path: str) -> None:
        """Check ``bundle_path`` in the background and serve it from the batch after it passes."""
        self._start_loading(bundle_path)

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> RunStats:
        restore = self._install_signals()
        try:
            return self._run()
        finally:
            restore()

    def _run(self) -> RunStats:
        cfg = self.config
        rt = self.runtime
        rt.uploader.start()
        if self.publisher is not None:
            self.publisher.start()
        if cfg.health.port is not None:
            self._metrics, self.metrics_port = serve_metrics(self.health, cfg.health.address, cfg.health.port)
            log.info("metrics on http://%s:%d/metrics", cfg.health.address, self.metrics_port)
        reader = threading.Thread(target=self._read, name="edgeloop-source", daemon=True)
        reader.start()
        log.info("serving %s from %s (%s)", self.runtime.model.describe(), self.source.name,
                 self.runtime.model.scorer.provider)
        self.started.set()
        if self.nucleus is not None:
            self._greengrass_started()
        try:
            self._serve(reader)
        except BaseException as err:
            if self.nucleus is not None and not isinstance(err, (KeyboardInterrupt, SystemExit)):
                from .greengrass import report_state

                log.error("fatal: %s: %s", type(err).__name__, err)
                report_state(self.nucleus, "ERRORED")
            raise
        finally:  # whatever ended the loop, the open window ships and nothing is left running
            reserve = min(1.0, self.config.service.grace_s / 4)  # for writing the last window
            stats = rt.close(upload_timeout=max(self._grace_left() - reserve, 0.1))
            if self.publisher is not None:
                try:
                    self.publisher.stop(max(min(self._grace_left() - reserve, 5.0), 0.1))
                except Exception:
                    log.exception("publisher did not stop cleanly")
            if self._follower is not None:
                self._follower.stop()
            if self._metrics is not None:
                self._metrics.shutdown()
                self._metrics.server_close()
            close = getattr(self.source, "close", None)
            if close is not None:
                close()
            self.stopping.set()
            log.info("stopped: %s", self.health.log_line())
        return stats

    def _serve(self, reader: threading.Thread) -> None:
        cfg, rt = self.config, self.runtime
        max_wait = cfg.batch.max_wait_ms / 1000.0
        last_log = time.monotonic()
        while True:
            batch = self.queue.take(cfg.batch.max_records, max_wait, TICK_S)
            if batch is None:
                return
            if batch:
                try:
                    rt.handle(batch)
                except Exception as err:  # a bug must cost one batch, never the service
                    rt.fail(batch, err)
            try:
                rt.tick()
            except Exception:  # a failing disk or a bug in the chores: logged, and serving goes on
                log.exception("engine chores failed; serving goes on")
            if self._ready is not None:
                model, self._ready = self._ready, None
                rt.swap(model)
            if self._reload.is_set() or self._config_changed():
                self._reload.clear()
                self._on_reload()
            if self.stopping.is_set() or self._source_done.is_set():
                # drain: once the source has let go (it may be waiting on a full queue, which this
                # loop keeps emptying), or half the grace is gone, refuse input and score what is queued
                if not reader.is_alive() or self._grace_left() < cfg.service.grace_s / 2:
                    self.queue.close()
                # a slow device must still exit in time: what cannot be scored within the grace
                # is dropped and counted, so the open window ships before the supervisor kills us
                if self._stop_at is not None and self._grace_left() < cfg.service.grace_s / 4:
                    self.queue.close()
                    dropped = self.queue.discard()
                    if dropped:
                        log.warning("grace running out: %d queued records dropped unscored", dropped)
            if cfg.health.log_interval_s and time.monotonic() - last_log >= cfg.health.log_interval_s:
                last_log = time.monotonic()
                log.info(self.health.log_line())

    def _greengrass_started(self) -> None:
        """RUNNING, and the configuration followed; on a thread, so a slow nucleus delays nothing."""
        from .greengrass import ConfigFollower, report_state

        self._follower = ConfigFollower(self.nucleus, self.request_reload)
        self._follower.start()
        threading.Thread(target=report_state, args=(self.nucleus, "RUNNING"), name="edgeloop-gg-state",
                         daemon=True).start()

    def _grace_left(self) -> float:
        if self._stop_at is None:
            return self.config.service.grace_s
        return self.config.service.grace_s - (time.monotonic() - self._stop_at)

    def _read(self) -> None:
        stage = self._parse
        emit = stage or self.queue.put
        try:
            self.source.run(emit, self.stopping)
        except Exception:
            log.exception("source %s failed; draining", self.source.name)
        finally:
            if stage is not None:
                stage.close()
            self._source_done.set()

    # -- hot swap ---------------------------------------------------------------------------------

    def _mtime(self) -> float | None:
        try:
            return Path(self.config_path).stat().st_mtime if self.config_path else None
        except OSError:
            return None

    def _config_changed(self) -> bool:
        every = self.config.service.watch_config_s
        if not every or not self.config_path or time.monotonic() - self._config_checked < every:
            return False
        self._config_checked = time.monotonic()
        mtime = self._mtime()
        if mtime != self._config_mtime:
            self._config_mtime = mtime
            return True
        return False

    def _on_reload(self) -> None:
        if self.config_path is None and self.nucleus is None:
            path = self._bundle_path
        else:
            where = self.config_path or "the Greengrass component configuration"
            try:
                new = load_runtime_config(self.config_path, self.overrides, self._nucleus_configuration())
                self._resolve_transports(new, self.input_path)
            except Exception as err:  # unreadable, not UTF-8, invalid, the nucleus not answering
                log.error("reload refused: %s: %s; still serving %s", where, err, self.runtime.model.describe())
                return
            self._apply_live(new)
            self._loaded = new
            path = new.bundle
        self._start_loading(path)

    def _nucleus_configuration(self) -> dict | None:
        if self.nucleus is None:
            return None
        from .greengrass import component_configuration

        return component_configuration(self.nucleus)

    def _apply_live(self, new: RuntimeConfig) -> None:
        """What a reload can change while serving: windows (from the next window on), the outlier
        threshold, the publish topics and queue, the record topics (Greengrass IPC). The rest is
        named in a warning: it needs a restart."""
        old = self._loaded
        applied = []
        if new.window != old.window:
            self.runtime.set_window(new.window)
            applied.append("window")
        if new.scoring.threshold != old.scoring.threshold:
            self.runtime.config.scoring.threshold = new.scoring.threshold
            applied.append("scoring.threshold")
            scoring = old.scoring.model_copy(update={"threshold": new.scoring.threshold})
            old = old.model_copy(update={"scoring": scoring})  # the rest of scoring still needs a restart
        if (new.publish != old.publish and self.publisher is not None and new.publish.kind == old.publish.kind
                and new.publish.mqtt == old.publish.mqtt and new.publish.qos == old.publish.qos):  # same connection
            self.publisher.queue.reconfigure(new.publish, new.device_id)
            self.publisher.config = new.publish
            applied.append("publish")
        retarget = getattr(self.source, "retarget", None)
        if new.source != old.source and retarget is not None and retarget(new.source):
            applied.append("source")
        if applied:
            log.info("reload: applied %s", ", ".join(applied))
        rest = [k for k in type(new).model_fields
                if k != "bundle" and k not in applied and getattr(new, k) != getattr(old, k)]
        if rest:
            log.warning("reload: changes to %s take effect at the next restart", ", ".join(rest))

    def _start_loading(self, path: str) -> None:
        if self._loading is not None and self._loading.is_alive():
            log.warning("a model is already being loaded; %s waits for the next reload", path)
            return
        self._loading = threading.Thread(target=self._load, args=(str(path),), name="edgeloop-loader", daemon=True)
        self._loading.start()

    def _load(self, path: str) -> None:
        try:
            bundle = load_bundle(path)
            if path == self._bundle_path and bundle.manifest.files == self._bundle_files:
                log.info("reload: bundle %s unchanged", path)
                return
            model = load_model(path, self.config.scoring, bundle=bundle, max_batch=self.config.batch.max_records)
            current = self.runtime.model.bundle.manifest.input.feature_names
            if model.feature_names != current:
                log.warning("new model %s takes features %s (was %s)", model.version, model.feature_names, current)
        except (BundleError, ContractError, ScoringError, OSError) as err:
            self.health.swaps_refused += 1
            log.error("model refused, still serving %s: %s", self.runtime.model.describe(), err)
            if not self.stopping.is_set():  # the events file closes at stop
                self.runtime.events.write({"kind": "model_refused", "bundle": path, "reason": str(err),
                                           "serving": self.runtime.model.version})
            return
        self._bundle_path, self._bundle_files = path, bundle.manifest.files
        self._ready = model

    # -- signals ------------------------------------------------------------------------------------

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def stop(signum, _frame):
            if self._stop_at is not None:
                log.error("second %s: exiting now, without draining", signal.Signals(signum).name)
                raise SystemExit(1)
            log.info("%s: draining (grace %.0fs)", signal.Signals(signum).name, self.config.service.grace_s)
            self.request_stop()

        saved = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        saved[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

        def restore() -> None:
            for s, handler in saved.items():
                signal.signal(s, handler)

        return restore


def run_service(config: RuntimeConfig, input_path: str | None = None, **kwargs) -> RunStats:
    return Service(config, input_path=input_path, **kwargs).run()


def run_file(config: RuntimeConfig, path: str | Path | None = None, **kwargs) -> RunStats:
    """Run the service over a file (or '-' for stdin) to its end."""
    return run_service(config, input_path=None if path is None else str(path), **kwargs)
