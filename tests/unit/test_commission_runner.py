"""`heatloop commission`: its usage errors and the run's progress file (`--resume`).

The end-to-end runs against real processes are in tests/hil/test_commission.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from controller import cli
from controller.commission import (
    ResumeError,
    done_steps,
    load_progress,
    outcome_of,
    parse_only,
    progress_path,
    save_progress,
    step_ids,
)
from interlocks.rules import RULES
from plc_io.site import demo_site_text


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(demo_site_text().replace('dir = "state"', f'dir = "{tmp_path / "state"}"'))
    return p


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(["commission", *argv])
    return code, capsys.readouterr().err


# ---- usage ----


def test_step_ids_are_the_rules_in_engine_order_then_the_watchdog() -> None:
    assert step_ids() == [r.id for r in RULES] + ["WD"]


def test_only_keeps_run_order_and_an_unknown_id_names_itself_and_the_valid_ones() -> None:
    assert parse_only("WD,IL-04") == ["IL-04", "WD"]
    assert parse_only(None) is None
    with pytest.raises(ValueError, match=r"unknown step id IL-99.*IL-01.*WD"):
        parse_only("IL-04,IL-99")
    with pytest.raises(ValueError, match="expected step ids"):
        parse_only(" , ")


def test_an_unknown_rule_id_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], site_file: Path
) -> None:
    code, err = run(capsys, "--site", str(site_file), "--sim", "--only", "IL-04,IL-42")
    assert code == 2
    assert "IL-42" in err and "IL-04" in err and err.count("\n") == 1  # one line


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("--auto",), ("--auto", "physical")),
        (("--auto", "--method", "physical"), ("--auto", "physical")),
        (("--sim", "--method", "forced"), ("--method forced", "--sim")),
        (("--method", "sim"), ("--method sim", "--sim")),
        (("--sim", "--resume", "--only", "IL-04"), ("--resume", "--only")),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
    site_file: Path,
    argv: tuple[str, ...],
    words: tuple[str, ...],
) -> None:
    code, err = run(capsys, "--site", str(site_file), *argv)
    assert code == 2, err
    assert err.count("\n") == 1
    for w in words:
        assert w in err


def test_a_missing_site_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "--sim", "--auto")
    assert code == 2 and "--site" in err


def test_a_bad_timeout_is_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str], site_file: Path
) -> None:
    code, err = run(capsys, "--site", str(site_file), "--sim", "--timeout-s", "nan")
    assert code == 2 and "--timeout-s" in err


# ---- the progress file ----


def _progress(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "run_id": "abc",
        "site_sha256": "a" * 64,
        "engineer": "ada",
        "started_wall": 1.0,
        "steps": [
            {"id": "IL-01", "result": "passed"},
            {"id": "IL-02", "result": "not_testable"},
            {"id": "IL-03", "result": "aborted"},
            {"id": "IL-04", "result": "skipped"},
        ],
        "finished": False,
    }
    base.update(kw)
    return base


def test_progress_round_trips_and_resume_repeats_only_unfinished_steps(tmp_path: Path) -> None:
    path = progress_path(tmp_path / "reports", "demo site/1")
    assert path.parent == tmp_path / "reports" and "/" not in path.name[5:]
    save_progress(path, _progress())
    got = load_progress(path, "a" * 64, "ada")
    assert got["run_id"] == "abc"
    # a verdict is kept; an aborted or skipped step runs again
    assert sorted(done_steps(got)) == ["IL-01", "IL-02"]


@pytest.mark.parametrize(
    ("kw", "sha", "engineer", "words"),
    [
        ({}, "b" * 64, "ada", "site file changed"),
        ({}, "a" * 64, "bob", "belongs to engineer 'ada'"),
        ({"finished": True}, "a" * 64, "ada", "is finished"),
        ({"steps": "x"}, "a" * 64, "ada", "not a run's progress file"),
    ],
)
def test_resume_refuses_with_one_line(
    tmp_path: Path, kw: dict[str, object], sha: str, engineer: str, words: str
) -> None:
    path = tmp_path / ".run-x.json"
    save_progress(path, _progress(**kw))
    with pytest.raises(ResumeError, match=words) as e:
        load_progress(path, sha, engineer)
    assert "\n" not in str(e.value)


def test_resume_without_a_run_or_with_garbage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="no run to continue"):
        load_progress(tmp_path / ".run-x.json", "a" * 64, "ada")
    bad = tmp_path / ".run-y.json"
    bad.write_text("{half")
    with pytest.raises(ResumeError, match="unreadable"):
        load_progress(bad, "a" * 64, "ada")


def test_a_failed_write_leaves_the_old_progress_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / ".run-x.json"
    save_progress(path, _progress())

    def broken(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        save_progress(path, _progress(run_id="new"))
    assert json.loads(path.read_text())["run_id"] == "abc"
    assert [p.name for p in tmp_path.iterdir()] == [".run-x.json"]


def test_outcome_names_the_worst_step() -> None:
    def rs(*kinds: str) -> list[dict[str, str]]:
        return [{"result": k} for k in kinds]

    assert outcome_of(rs("passed", "not_testable"), 2) == "passed"
    assert outcome_of(rs("passed", "failed", "skipped"), 3) == "failed"
    assert outcome_of(rs("passed", "aborted", "failed"), 3) == "aborted"
    assert outcome_of(rs("passed"), 2) == "incomplete"  # a step never ran
    assert outcome_of(rs("not_testable"), 1) == "incomplete"  # nothing was proved


def test_no_controller_answering_exits_1_in_one_line_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], site_file: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    code, err = run(capsys, "--site", str(site_file), "--sim", "--auto", "--report", str(report))
    assert code == 1
    assert "no controller" in err and err.count("\n") == 1
    assert not report.exists()


# ---- the observer: read only ----


class _ReadOnlyPlc:
    """A transport that fails the test if anything is written to it."""

    def __init__(self) -> None:
        self.reads = 0

    @property
    def health(self) -> object:
        from plc_io.transport import CommsHealth, LinkState

        return CommsHealth(LinkState.OK)

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def read_inputs(self) -> object:
        from plc_io.image import ProcessImage, Quality, Sample

        self.reads += 1
        return ProcessImage({"leak_reuse": Sample(True, Quality.GOOD, 0.0)})

    async def read_outputs(self) -> object:
        from plc_io.image import ProcessImage, Quality, Sample

        return ProcessImage(
            {
                "reuse_valve_cmd": Sample(0.0, Quality.GOOD, 0.0),
                "secondary_pump_cmd": Sample(None, Quality.COMMS_LOST, 0.0),
            }
        )

    async def write_outputs(self, values: object) -> object:
        raise AssertionError("the commissioning observer wrote the PLC")

    def resend_all(self) -> None:
        raise AssertionError("the commissioning observer asked for a write")


class _Link:
    async def status(self) -> dict[str, object]:
        return {
            "mode": "LEAK_TRIP",
            "interlocks": {"active": ["IL-04"], "latched": ["IL-04"], "bypassed": []},
            "outputs": {"reuse_valve_cmd": {"value": 0.0, "level": "interlock"}},
            "link": {"state": "ok"},
        }


async def test_the_observer_only_reads_and_never_serves_an_unreadable_point_as_a_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import controller.runtime as runtime
    from controller.commission_io import Observer
    from controller.commission_plan import Observation

    plc = _ReadOnlyPlc()
    monkeypatch.setattr(runtime, "make_transport", lambda site: plc)
    obs = Observer(cli.demo_site(), _Link(), Observation)  # type: ignore[arg-type]
    await obs.start()
    try:
        o = await obs.next(2.0)
        o = await obs.next(2.0)
    finally:
        await obs.close()
    assert plc.reads >= 2
    assert o.inputs == {"leak_reuse": True}
    # a point the PLC could not give is None, and the whole reading is not ok
    assert o.outputs == {"reuse_valve_cmd": 0.0, "secondary_pump_cmd": None}
    assert o.plc_ok is False
    assert (o.mode, o.active, o.latched, o.levels) == (
        "LEAK_TRIP",
        frozenset({"IL-04"}),
        frozenset({"IL-04"}),
        {"reuse_valve_cmd": "interlock"},
    )


# ---- the terminal ----


async def test_the_terminal_takes_lines_that_arrive_together_one_question_at_a_time() -> None:
    import io

    from controller.commission_io import Terminal

    r, w = os.pipe()
    os.write(w, b"\nyes\r\nlast")
    os.close(w)
    out = io.StringIO()
    with os.fdopen(r) as inp:
        term = Terminal(out=out, inp=inp)
        assert await term.ask("go?") == ""
        assert await term.ask("sign?") == "yes"
        assert await term.ask("more?") == "last"  # no newline before the end
        assert await term.ask("again?") is None  # end of input
    assert out.getvalue().splitlines() == ["go?", "sign?", "more?", "again?"]


async def test_an_abort_ends_a_question_nobody_answers() -> None:
    import asyncio
    import io

    from controller.commission_io import Terminal

    r, w = os.pipe()
    try:
        with os.fdopen(r) as inp:
            term = Terminal(out=io.StringIO(), inp=inp)
            abort = asyncio.Event()
            asyncio.get_running_loop().call_later(0.05, abort.set)
            assert await asyncio.wait_for(term.ask("go?", abort), 10.0) is None
    finally:
        os.close(w)


def test_an_empty_engineer_or_comment_is_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str], site_file: Path
) -> None:
    for argv in (("--engineer", " "), ("--comment", "x" * 4001)):
        code, err = run(capsys, "--site", str(site_file), "--sim", *argv)
        assert code == 2 and argv[0] in err


def test_the_observer_keeps_only_the_current_steps_reads() -> None:
    """At 20 Hz a run of hours would otherwise hold every read it ever made."""
    from controller.commission_io import Observer
    from controller.commission_plan import Observation

    obs = Observer(cli.demo_site(), _Link(), Observation)  # type: ignore[arg-type]
    fields = {"plc_ok": True, "inputs": {}, "outputs": {}, "status_t": None}
    obs.history = [obs.make(t=float(t), **fields, **obs._fields) for t in range(10)]
    obs.forget_before(7.0)
    assert [o.t for o in obs.history] == [7.0, 8.0, 9.0] and obs.latest.t == 9.0
    obs.forget_before(100.0)  # nothing newer yet: the newest stays as `latest`
    assert [o.t for o in obs.history] == [9.0]
