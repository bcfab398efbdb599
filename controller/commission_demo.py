"""`make commission-demo`: a whole `heatloop commission --sim --auto` run on the demo site.

It writes a copy of the demo site into a folder (free ports on 127.0.0.1, its own state
directory, the user running it as engineer, dwell times short enough that the plant is back in
heat reuse between steps), starts `heatloop sim serve` and `heatloop run` on it as separate
processes talking Modbus over loopback, runs the procedure, stops both, and prints where the
record is. Exit code: the procedure's (0 every step passed and the record is filed).

    python -m controller.commission_demo [FOLDER]     # default build/commission-demo
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from controller.channel import NoController, call, socket_path
from plc_io.site import demo_site_text, load_site, set_key

# Seconds, not minutes, between a trip's reset and heat reuse again, so each step starts from a
# running reuse circuit and measures a real change of its outputs.
DWELLS = {
    "customer_ready_dwell_s": 5,
    "reject_dwell_s": 5,
    "min_mode_dwell_s": 5,
    "reuse_reentry_min_s": 5,
}
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_site(folder: Path) -> Path:
    """The demo site in `folder`, ready for a commissioning run on this machine."""
    text = demo_site_text()
    for section, key, value in (
        ("plc", "port", free_port()),
        ("sim", "opcua_port", free_port()),
        ("bms", "enabled", False),
        ("state", "dir", "state"),
        ("roles", "engineer", [getpass.getuser()]),
        *(("control", k, v) for k, v in DWELLS.items()),
    ):
        text = set_key(text, section, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.toml"
    path.write_text(text, encoding="utf-8")
    load_site(path)  # the edits took: checked, not assumed
    return path


def heatloop(*args: str) -> list[str]:
    return [sys.executable, "-m", "controller.cli", *args]


def wait_controller(site_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """Until the simulator's fault interface listens and the controller answers its status with
    a good PLC link."""
    site = load_site(site_path)
    path = socket_path(site.state_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{' '.join(map(str, p.args))} exited with {p.returncode}")
        try:
            socket.create_connection(("127.0.0.1", site.sim.opcua_port), 1.0).close()
            reply = call(path, "status", timeout_s=2.0)
            if reply.get("ok") and reply["data"]["link"]["state"] == "ok":
                return
        except (NoController, OSError, KeyError, TypeError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the controller did not report a good PLC link in {START_TIMEOUT_S:g} s")


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10.0)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0] if argv else "build/commission-demo").resolve()
    site_path = write_site(folder)
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, args in (
            ("sim", heatloop("sim", "serve", "--site", str(site_path))),
            ("run", heatloop("run", "--site", str(site_path))),
        ):
            with (logs / f"{name}.log").open("wb") as log:
                procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env))
        print(f"simulated PLC and controller started on {site_path} (logs in {logs})")
        wait_controller(site_path, procs)
        report = folder / "report"
        cmd = heatloop(
            "commission", "--site", str(site_path), "--sim", "--auto", "--report", str(report)
        )
        rc = subprocess.call(cmd, env=env)
    except (RuntimeError, OSError) as e:
        print(f"commission demo: {e}", file=sys.stderr)
        return 1
    finally:
        for p in reversed(procs):
            stop(p)
    pages = sorted(report.glob("*.html"))
    if pages:
        print(f"record: {pages[-1]}")
        print(f"verify: heatloop commission verify --site {site_path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
