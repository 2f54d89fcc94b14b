"""The launcher's supervisor: restart policy, backoff, and which exits stop the mesh (ops/launcher.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from libs.settings import SettingsError, load_settings
from ops.launcher import (
    CONFIG_ERROR_EXIT,
    UNKNOWN_EXIT,
    MeshFailed,
    RestartPolicy,
    Supervisor,
    classify_exit,
    describe_exit,
)


def test_backoff_doubles_from_half_a_second_to_a_cap() -> None:
    policy = RestartPolicy()
    assert [policy.backoff_s(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.backoff_s(100) == 30  # no overflow however long it flaps
    assert RestartPolicy(initial_backoff_s=1, max_backoff_s=3).backoff_s(3) == 3


def test_config_error_is_the_exit_code_of_load_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.cache.settings import CacheSettings

    monkeypatch.setenv("TOLLGATE_CACHE_PORT", "not-a-port")
    with pytest.raises(SettingsError) as exited:  # what a service's main() does with bad settings
        load_settings(CacheSettings)
    assert exited.value.code == CONFIG_ERROR_EXIT


@pytest.mark.parametrize(("code", "served", "failed", "verdict"), [
    (CONFIG_ERROR_EXIT, False, 1, "config_error"),   # bad settings: restarting cannot help
    (CONFIG_ERROR_EXIT, True, 0, "restart"),         # it served: 2 is then not about its settings
    (1, False, 4, "restart"),
    (1, False, 5, "crash_loop"),                     # five starts in a row that never served
    (-9, True, 0, "restart"),                        # SIGKILLed while serving
])
def test_classify_exit(code: int, served: bool, failed: int, verdict: str) -> None:
    assert classify_exit(code, served=served, failed_starts=failed, policy=RestartPolicy()) == verdict


def test_describe_exit_names_the_signal() -> None:
    assert describe_exit(-9) == "-9 (SIGKILL)"
    assert describe_exit(3) == "3"
    assert describe_exit(UNKNOWN_EXIT) == "an unknown code"  # a postmaster is not the launcher's child


@dataclass
class FakeUnit:
    """A child whose exits and health the test scripts."""

    name: str
    log_path: Path
    code: int | None = None
    serving: bool = True
    starts: int = 0
    next_exit: list[int | None] = field(default_factory=list)  # exit code of each restart (None: keeps running)

    def exit_code(self) -> int | None:
        return self.code

    def restart(self) -> None:
        self.starts += 1
        self.code = self.next_exit.pop(0) if self.next_exit else None

    def healthy(self) -> bool:
        return self.code is None and self.serving


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def supervisor(units: list[FakeUnit], clock: Clock, lines: list[str]) -> Supervisor:
    return Supervisor(units, RestartPolicy(), report=lines.append, clock=clock)


def test_a_killed_child_is_restarted_after_the_backoff_and_the_others_are_left_alone(tmp_path: Path) -> None:
    cache, router = FakeUnit("cache", tmp_path / "cache.log"), FakeUnit("router", tmp_path / "router.log")
    clock, lines = Clock(), []
    sup = supervisor([cache, router], clock, lines)
    cache.code = -9
    sup.tick()
    assert lines == ["tollgate: cache exited with -9 (SIGKILL); restarting in 0.5 s"]
    assert "restarting in 0.5 s" in cache.log_path.read_text()  # its log says so too
    clock.now += 0.4
    sup.tick()
    assert cache.starts == 0
    clock.now += 0.1
    sup.tick()
    assert cache.starts == 1 and router.starts == 0
    sup.tick()
    assert lines[-1] == "tollgate: cache is serving again (restart 1)"


def test_backoff_grows_while_it_keeps_dying_and_resets_after_a_stable_minute(tmp_path: Path) -> None:
    cache = FakeUnit("cache", tmp_path / "cache.log")
    clock, lines = Clock(), []
    sup = supervisor([cache], clock, lines)
    for delay in (0.5, 1, 2):
        cache.code = 1
        sup.tick()  # notices the exit
        assert lines[-1].endswith(f"restarting in {delay:g} s")
        clock.now += delay
        sup.tick()  # restarts
        sup.tick()  # sees it serving
    assert sup.restarts("cache") == 3
    clock.now += 59
    sup.tick()
    assert sup.restarts("cache") == 3
    clock.now += 1
    sup.tick()
    assert sup.restarts("cache") == 0
    cache.code = 1
    sup.tick()
    assert lines[-1].endswith("restarting in 0.5 s")


def test_a_configuration_error_on_restart_stops_the_mesh(tmp_path: Path) -> None:
    edge = FakeUnit("edge", tmp_path / "edge.log", next_exit=[CONFIG_ERROR_EXIT])
    clock, lines = Clock(), []
    sup = supervisor([edge], clock, lines)
    edge.code = -15
    sup.tick()
    clock.now += 0.5
    sup.tick()  # restarted; exits at once with 2
    with pytest.raises(MeshFailed, match="edge exited with 2: invalid configuration"):
        sup.tick()


def test_five_starts_in_a_row_that_never_serve_stop_the_mesh(tmp_path: Path) -> None:
    router = FakeUnit("router", tmp_path / "router.log", next_exit=[1, 1, 1, 1, 1])
    clock, lines = Clock(), []
    sup = supervisor([router], clock, lines)
    router.code = -9  # it served before this exit: not counted as a failed start
    with pytest.raises(MeshFailed, match="failed 5 times in a row without serving"):
        for _ in range(20):
            sup.tick()
            clock.now += 30
    assert router.starts == 5


def test_a_start_that_serves_clears_the_failed_starts(tmp_path: Path) -> None:
    unit = FakeUnit("cache", tmp_path / "cache.log", next_exit=[1, 1, 1, 1, None])
    clock, lines = Clock(), []
    sup = supervisor([unit], clock, lines)
    unit.code = 1
    for _ in range(20):
        sup.tick()
        clock.now += 30
    assert unit.starts == 5 and lines[-1] == "tollgate: cache is serving again (restart 5)"
    unit.next_exit = [1, 1, 1, 1]  # four more failed starts after it served once: not yet a crash loop
    unit.code = 1
    for _ in range(20):
        sup.tick()
        clock.now += 30
    assert unit.starts == 10 and unit.code is None


def test_a_restart_that_raises_counts_as_a_failed_start(tmp_path: Path) -> None:
    class Broken(FakeUnit):
        def restart(self) -> None:
            raise OSError("no such file")

    unit = Broken("redis", tmp_path / "redis.log", code=-9)
    clock, lines = Clock(), []
    sup = supervisor([unit], clock, lines)
    with pytest.raises(MeshFailed, match="redis failed to start"):
        for _ in range(20):
            sup.tick()
            clock.now += 30
    assert any("redis failed to start (OSError); restarting in" in line for line in lines)


def test_inference_replicas_take_consecutive_ports_and_the_model_lists_them_all() -> None:
    from ops.cli import default_models
    from ops.launcher import LauncherSettings, inference_replica_name

    s = LauncherSettings(inference_port=6000, inference_replicas=3, inference_engine="openai",
                         inference_models="m")
    assert s.inference_ports == [6000, 6001, 6002]
    assert default_models(s)[0]["inference_target"] == "127.0.0.1:6000,127.0.0.1:6001,127.0.0.1:6002"
    assert [inference_replica_name(i) for i in range(3)] == ["inference", "inference-2", "inference-3"]
    one = LauncherSettings(inference_port=6000)
    assert one.inference_ports == [6000] and default_models(one)[0]["inference_target"] == "127.0.0.1:6000"


def test_inference_replicas_are_bounded() -> None:
    from pydantic import ValidationError

    from ops.launcher import LauncherSettings

    with pytest.raises(ValidationError):
        LauncherSettings(inference_replicas=0)
