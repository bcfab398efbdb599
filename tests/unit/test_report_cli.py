"""`heatloop report` as a process on a state store written by the Journal: each format, dates
that do not parse, a reversed range, an empty range, a store that cannot be read, `--plot`
with and without matplotlib."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.journal import Journal, MeterWrite
from plc_io.site import demo_site_text

ROOT = Path(__file__).resolve().parents[2]
HEATLOOP = ROOT / ".venv" / "bin" / "heatloop"
T0 = 1_796_083_200.0  # 2026-12-01T00:00:00Z
IV = 900.0


def interval(start: float, kwh: float) -> dict[str, object]:
    return {
        "start_wall": start,
        "end_wall": start + IV,
        "closed": True,
        "covered_s": IV,
        "delivered_kwh": kwh,
        "it_energy_kwh": 50.0,
        "class_s": {"available": 800.0, "trip": 100.0},
        "mode_s": {"NORMAL_REUSE": 900.0},
        "flags": [],
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo site (state in ./state) with two days of intervals (1 kWh, then 2 kWh each)
    and one trip."""
    folder = tmp_path_factory.mktemp("report")
    path = folder / "site.toml"
    path.write_text(demo_site_text())
    ivs = [interval(T0 + k * IV, 1.0 if k < 96 else 2.0) for k in range(2 * 96)]
    irs = [{"id": 1, "cls": "trip", "start_wall": T0 + 3600, "end_wall": T0 + 4500,
            "detail": "IL-04 latched", "baseline_kw": 4.0, "lost_kwh": 1.0}]  # fmt: skip
    j = Journal(folder / "state" / "heatloop.db")
    j.write(
        [(T0 + 3600, "trip_latched", "IL-04", '{"hazard": "leak"}')],
        frozenset(),
        meter=MeterWrite(ivs, irs, {"v": 1}),
    )
    j.close()
    return path


def report(
    site: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HEATLOOP), "report", "--site", str(site), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def test_json_over_both_days(site: Path) -> None:
    r = report(site, "--from", "2026-12-01", "--to", "2026-12-02", "--format", "json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["delivered_kwh"] == pytest.approx(96 * 1.0 + 96 * 2.0)
    assert st["availability_pct"] == pytest.approx(100 * 800 / 900)
    assert (st["from"], st["to"]) == ("2026-12-01T00:00:00Z", "2026-12-03T00:00:00Z")
    assert [t["rule"] for t in st["trips"]] == ["IL-04"]
    assert st["source"] == "controller" and st["site"]


def test_a_date_only_to_includes_that_day_and_a_date_time_has_its_offset(site: Path) -> None:
    r = report(site, "--from", "2026-12-02", "--to", "2026-12-02", "--format", "json")
    assert json.loads(r.stdout)["delivered_kwh"] == pytest.approx(96 * 2.0)
    # 01:00+01:00 is midnight UTC: the same first day
    r = report(site, "--from", "2026-12-01T01:00+01:00", "--to", "2026-12-01T12:00:00Z",
               "--format", "json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["delivered_kwh"] == pytest.approx(48 * 1.0)


def test_markdown_is_the_default_and_html_and_csv_are_offered(site: Path, tmp_path: Path) -> None:
    r = report(site, "--from", "2026-12-01", "--to", "2026-12-02")
    assert r.returncode == 0 and r.stdout.startswith("# Heat delivery statement")
    assert "| IL-04 | leak |" in r.stdout
    out = tmp_path / "s.html"
    r = report(site, "--from", "2026-12-01", "--to", "2026-12-02", "--format", "html",
               "--out", str(out))  # fmt: skip
    assert r.returncode == 0 and r.stdout == ""
    assert out.read_text().startswith("<!DOCTYPE html>")
    r = report(site, "--from", "2026-12-01", "--to", "2026-12-02", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [(x["date"], float(x["delivered_kwh"])) for x in rows] == [
        ("2026-12-01", 96.0),
        ("2026-12-02", 192.0),
    ]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--from", "01/12/2026", "--to", "2026-12-02"], "--from '01/12/2026': expected an ISO"),
        (["--from", "2026-12-01", "--to", "2026-13-01"], "--to '2026-13-01': expected an ISO"),
        (["--from", "2026-12-01", "--to", "yesterday"], "--to 'yesterday': expected an ISO"),
        (["--from", "2026-12-03", "--to", "2026-12-01"], "is not after --from '2026-12-03'"),
        (["--from", "2026-12-01T06:00Z", "--to", "2026-12-01T06:00Z"], "is not after --from"),
        (["--from", "2026-12-01", "--to", "2026-12-02", "--format", "pdf"], "--format 'pdf'"),
    ],
)
def test_bad_dates_and_a_reversed_range_exit_2_naming_the_flag(
    site: Path, args: list[str], words: str
) -> None:
    r = report(site, *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("heatloop report: ") and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_an_empty_range_says_so_and_exits_0(site: Path) -> None:
    line = "no metering data between 2027-01-01T00:00:00Z and 2027-01-02T00:00:00Z"
    for fmt in ("md", "html", "csv", "json"):
        r = report(site, "--from", "2027-01-01", "--to", "2027-01-01", "--format", fmt)
        assert r.returncode == 0, r.stderr
        assert line in r.stderr
        if fmt == "json":
            assert json.loads(r.stdout)["empty"] is True
        else:
            assert line in r.stdout


def test_a_store_that_cannot_be_read_exits_1_and_a_bad_site_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(demo_site_text())
    r = report(path, "--from", "2026-12-01", "--to", "2026-12-02")
    assert r.returncode == 1 and "no state store there" in r.stderr
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "heatloop.db").write_text("garbage " * 1000)
    r = report(path, "--from", "2026-12-01", "--to", "2026-12-02")
    assert r.returncode == 1 and "cannot read the state store" in r.stderr
    path.write_text("[site\n")
    r = report(path, "--from", "2026-12-01", "--to", "2026-12-02")
    assert r.returncode == 2 and "nothing started" in r.stderr


def test_plot_writes_a_png(site: Path, tmp_path: Path) -> None:
    png = tmp_path / "s.png"
    r = report(site, "--from", "2026-12-01", "--to", "2026-12-02", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it_and_still_writes_the_statement(
    site: Path, tmp_path: Path
) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    # sitecustomize runs before the command: matplotlib is then "not installed"
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(hide)}
    out, png = tmp_path / "s.md", tmp_path / "s.png"
    r = report(site, "--from", "2026-12-01", "--to", "2026-12-02", "--out", str(out),
               "--plot", str(png), env=env)  # fmt: skip
    assert r.returncode == 1
    assert r.stderr == (
        "heatloop report: --plot: matplotlib is not installed: pip install 'heatloop[plots]' "
        "(the statement was written)\n"
    )
    assert out.read_text().startswith("# Heat delivery statement") and not png.exists()


def test_the_report_runs_without_loading_the_plant_model(site: Path) -> None:
    code = (
        "import sys\nfrom controller.cli import main\n"
        "rc = main(['report', '--site', sys.argv[1], '--from', '2026-12-01', '--to', "
        "'2026-12-01', '--format', 'json'])\n"
        "assert 'sim' not in sys.modules and not any(m.startswith('sim.') for m in sys.modules)\n"
        "sys.exit(rc)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(site)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
