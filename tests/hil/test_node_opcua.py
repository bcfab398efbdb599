"""heatloop against an independent OPC UA stack: node-opcua 2.182.2 as a PLC stand-in.

The stand-in (`tests/hil/nodeopcua/server.mjs`, real processes on 127.0.0.1) looks like a PLC
program's address space, not like heatloop's own simulated PLC: variables typed as PLC programs
declare them (Float, Double, UInt16, Int16, Byte, Int32, Boolean), reached only by `nsu=` node
ids (its namespace is not `urn:heatloop:plc` and is registered after two others), a DESIGN §7
watchdog of its own, at most two sessions, and Basic256Sha256 SignAndEncrypt with a self-signed
certificate of its own. Each test starts from the demo site with `opcua_node`/`opcua_type` on
every tag.

`make test` installs the stand-in (`npm ci --prefix tests/hil/nodeopcua`); without Node or
without that install these tests fail with one line saying so, they are never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from plc_io.image import Quality
from plc_io.opcua import OpcuaTransport
from plc_io.site import Site, demo_site_text, load_site
from plc_io.tags import Tag
from tests.hil.conftest import free_port
from tests.hil.procs import HOLDOFF_S, ROOT, WATCHDOG_S, ControllerProc, set_key, stop_process

pytestmark = pytest.mark.hil

NODE_DIR = ROOT / "tests" / "hil" / "nodeopcua"
URI = "urn:vendor:plc:DB_Heat"  # the PLC program's namespace: not urn:heatloop:plc
DECOYS = ("urn:vendor:diagnostics", "urn:vendor:io")  # registered first: URI's index moves
START_S = 60.0  # node-opcua loads the standard nodeset (about 6 s here) and makes its cert
# How the PLC program declares each tag (the rest: Float for analogue tags, Boolean for bools):
# REAL/LREAL for temperatures and setpoints, WORD/UINT for counters, INT, BYTE and DINT too.
PLC_TYPES = {
    "heartbeat": "UInt16",
    "plc_watchdog_trips": "UInt16",
    "primary_pump_speed_cmd": "UInt16",
    "secondary_pump_speed_cmd": "Byte",
    "drycooler_fan_cmd": "Double",
    "heat_meter_energy": "Double",
    "reuse_valve_pos": "Int16",
    "it_power": "Int32",
}
INTEGER_TYPES = frozenset({"SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32"})
# Field inputs as the PLC reads them: analogue tags 30 % up their range (fractional, so a Float
# really carries float32 precision), dry leak sensors, running pumps, no customer.
BOOL_INPUTS = {
    "leak_primary": False,
    "leak_reuse": False,
    "customer_ready": False,
    "primary_pump_a_running": True,
    "primary_pump_b_running": True,
    "secondary_pump_running": False,
    "drycooler_fault": False,
}


def plc_type(tag: Tag) -> str:
    return PLC_TYPES.get(tag.name, "Boolean" if tag.is_bool else "Float")


def node_id(tag: Tag, k: int) -> str:
    """Inputs by Siemens-style quoted string ids, outputs by numeric ids (both seen on PLCs)."""
    return f's="DB_Heat"."{tag.name}"' if not tag.is_output else f"i={2001 + k}"


def f32(v: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", v))[0])


def as_plc_holds(tag: Tag, value: float | bool) -> float | bool:
    """The value a variable of the tag's PLC type holds after `value` was written or set."""
    t = plc_type(tag)
    if t == "Boolean":
        return bool(value)
    if t in INTEGER_TYPES:
        return float(round(value))
    return f32(value) if t == "Float" else float(value)


def input_value(tag: Tag) -> float | bool:
    if tag.is_bool:
        return BOOL_INPUTS.get(tag.name, False)
    v = tag.lo + 0.3 * (tag.hi - tag.lo) + 0.01
    return float(round(v)) if plc_type(tag) in INTEGER_TYPES else v


# ---- the stand-in process ----


class NodePlc:
    """`node server.mjs` with its stdin/stdout control lines (see the server's header)."""

    def __init__(self, folder: Path, site_text: str, security: str) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not installed: the node-opcua PLC stand-in needs Node.js 20")
        if not (NODE_DIR / "node_modules" / "node-opcua-server").is_dir():
            pytest.fail(
                f"node-opcua is not installed: run `npm ci --prefix {NODE_DIR}` (make test)"
            )
        self.folder = folder
        self.port = free_port()
        self.pki = folder / "plc-pki"
        site = load_site_text(folder, site_text)
        layout = {
            "namespace_uri": URI,
            "decoy_namespaces": list(DECOYS),
            "watchdog_s": site.plc.watchdog_s,
            "holdoff_s": site.plc.watchdog_holdoff_s,
            "tags": [
                {
                    "name": t.name,
                    "node": node_id(t, k),
                    "type": plc_type(t),
                    "direction": t.direction.value,
                    # a PLC powers up with its outputs safe
                    "value": as_plc_holds(t, t.safe if t.is_output else input_value(t)),
                    "safe": None if t.safe is None else as_plc_holds(t, t.safe),
                }
                for k, t in enumerate(site.tags)
            ],
        }
        (folder / "layout.json").write_text(json.dumps(layout, indent=1), encoding="utf-8")
        self.log_path = folder / "node-plc.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                node,
                str(NODE_DIR / "server.mjs"),
                *("--port", str(self.port), "--layout", str(folder / "layout.json")),
                *("--pki", str(self.pki), "--security", security),
            ],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="node-plc", daemon=True)
        self._reader.start()
        if not self._ready.wait(START_S):
            self.close()
            raise AssertionError(f"node-opcua stand-in not ready in {START_S} s:\n{self.tail()}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("json "):
                self._answers.put(json.loads(line[5:]))
            else:  # node-opcua's own notices go to stdout too: keep them in the log
                self._log.write(raw)
                self._log.flush()
                if line == f"ready {self.port}":
                    self._ready.set()

    def tail(self) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-20:])

    def ask(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.poll() is None, self.tail()
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        try:
            got = self._answers.get(timeout=10.0)
        except queue.Empty:
            raise AssertionError(f"the stand-in did not answer {req}:\n{self.tail()}") from None
        assert "error" not in got, got["error"]
        return got

    def state(self) -> dict[str, Any]:
        return self.ask(cmd="get")

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/"

    @property
    def certificate(self) -> Path:
        return self.pki / "server" / "own" / "certs" / "certificate.pem"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the server shuts down cleanly on end of input
        stop_process(self.proc)
        self._reader.join(2.0)
        self._log.close()


# ---- site files ----


def nodeopcua_site_text(
    endpoint: str,
    state_dir: Path,
    security: str = "None",
    declare_types: bool = True,
    **opcua: Any,
) -> str:
    """The demo site on OPC UA: every tag by `nsu=` id, with its `opcua_type` if
    `declare_types` (else the transport takes each node's DataType), quick watchdog."""
    text = demo_site_text()
    for section, key, value in (
        ("plc", "transport", "opcua"),
        ("plc", "watchdog_s", WATCHDOG_S),
        ("plc", "watchdog_holdoff_s", HOLDOFF_S),
        ("bms", "port", free_port()),
        ("sim", "opcua_port", free_port()),
        ("state", "dir", str(state_dir)),
        ("control", "customer_ready_dwell_s", 0),
    ):
        text = set_key(text, section, key, value)
    # The ids go in right after each [tags.<name>] header; TOML literal strings keep the quotes.
    site = load_site_text(None, text)
    for k, t in enumerate(site.tags):
        header = f"[tags.{t.name}]\n"
        assert text.count(header) == 1, header
        text = text.replace(
            header,
            f"{header}opcua_node = 'nsu={URI};{node_id(t, k)}'\n"
            + (f'opcua_type = "{plc_type(t)}"\n' if declare_types else ""),
        )
    keys = {"endpoint": endpoint, "security": security, **opcua}
    text += "\n[plc.opcua]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return text


def load_site_text(folder: Path | None, text: str) -> Site:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(folder or tmp) / "site-check.toml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_site(path)
        finally:
            path.unlink()


def write_site(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ---- fixtures ----


@pytest.fixture(scope="module")
def plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodePlc]:
    """One stand-in with security None for the module (each test resets what it changes)."""
    folder = tmp_path_factory.mktemp("node-plc")
    text = nodeopcua_site_text("opc.tcp://127.0.0.1:1/", folder / "state")
    p = NodePlc(folder, text, "none")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def fresh(plc: NodePlc) -> Iterator[NodePlc]:
    """The shared stand-in with its fault cleared, no session open, session counts from now."""
    plc.ask(cmd="fault", name="none")
    deadline = time.monotonic() + 40.0  # a killed client's session lasts its timeout
    while plc.state()["sessions"]["open"]:
        assert time.monotonic() < deadline, plc.state()["sessions"]
        time.sleep(0.1)
    plc.ask(cmd="reset")
    yield plc
    plc.ask(cmd="fault", name="none")


class Clock:
    """A transport clock the test moves, so back-off never makes a test wait."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@contextlib.asynccontextmanager
async def transport(site: Site, clock: Clock | None = None) -> AsyncIterator[OpcuaTransport]:
    tx = OpcuaTransport(site, clock=clock or time.monotonic)
    try:
        yield tx
    finally:
        await tx.close()


def site_for(plc: NodePlc, folder: Path, declare_types: bool = True, **opcua: Any) -> Site:
    text = nodeopcua_site_text(plc.endpoint, folder / "state", declare_types=declare_types, **opcua)
    return load_site(write_site(folder, text))


async def connected(tx: OpcuaTransport, clock: Clock | None = None, within_s: float = 15.0) -> bool:
    """Whether the transport gets connected within `within_s` (with a test clock, past any
    back-off at once; a transport still closing its last session may decline an attempt)."""
    deadline = time.monotonic() + within_s
    while True:
        await tx.connect()
        if tx.health.state.value == "ok":
            return True
        if time.monotonic() > deadline:
            return False
        if clock is not None:
            clock.t += 600.0
        await asyncio.sleep(0.1)


# ---- tests ----

DECLARED = pytest.mark.parametrize(
    "declare_types", [True, False], ids=["opcua_type-declared", "DataType-read-at-connect"]
)


@DECLARED
async def test_inputs_read_good_through_nsu_ids_and_plc_types(
    fresh: NodePlc, tmp_path: Path, declare_types: bool
) -> None:
    """Every input, by `nsu=` id on a namespace at index 4, of a PLC's own type, reads good
    with the value the PLC holds (a Float carries float32 precision, nothing more)."""
    site = site_for(fresh, tmp_path, declare_types)
    assert fresh.state()["namespace_index"] == 2 + len(DECOYS)  # not 2, where a naive client looks
    async with transport(site) as tx:
        assert await connected(tx), tx.health.last_error
        img = await tx.read_inputs()
        state = fresh.state()
        for t in site.inputs:
            s = img[t.name]
            assert s.quality is Quality.GOOD, (t.name, s, tx.health.last_error)
            want = state["values"][t.name]
            assert s.value == as_plc_holds(t, want), (t.name, s.value, want)
            if t.name not in ("plc_watchdog_tripped", "plc_watchdog_trips"):
                assert s.value == as_plc_holds(t, input_value(t)), t.name
        # a change at the PLC arrives too (not a value cached at connect)
        tag = site.tag("it_supply_temp")
        fresh.ask(cmd="set", values={"it_supply_temp": 33.3})
        deadline = time.monotonic() + 10.0
        while (await tx.read_inputs())[tag.name].value != f32(33.3):
            assert time.monotonic() < deadline, "the new supply temperature never arrived"
            await asyncio.sleep(0.1)
        fresh.ask(cmd="set", values={"it_supply_temp": input_value(tag)})


@DECLARED
async def test_typed_writes_land_in_the_plc_variables(
    fresh: NodePlc, tmp_path: Path, declare_types: bool
) -> None:
    """Every output lands as the PLC's own type (Float, Double, UInt16, Byte, Boolean): no
    BadTypeMismatch, and the stand-in holds each value as that type holds it; whether the site
    file declares the types or the transport reads each node's DataType at connect."""
    site = site_for(fresh, tmp_path, declare_types)
    # Not the safe values, so a landed write is told apart from the power-up image.
    values: dict[str, float | bool] = {
        "reuse_valve_cmd": 42.7,
        "drycooler_fan_cmd": 33.3,
        "primary_pump_speed_cmd": 61.4,
        "secondary_pump_speed_cmd": 55.6,
        "primary_pump_a_cmd": False,
        "primary_pump_b_cmd": True,
        "secondary_pump_cmd": True,
        "customer_isolation_cmd": True,
        "reuse_isolation_cmd": True,
    }
    async with transport(site) as tx:
        assert await connected(tx), tx.health.last_error
        result = await tx.write_outputs(values)
        assert dict(result.failed) == {}, result.failed
        assert set(values) | {"heartbeat"} <= set(result.written)
        held = fresh.state()["values"]
        for name, v in values.items():
            assert held[name] == as_plc_holds(site.tag(name), v), (name, held[name], v)
        # the transport's own read-back agrees with the PLC
        back = await tx.read_outputs()
        for name, v in values.items():
            assert back[name].quality is Quality.GOOD, (name, back[name])
            assert back[name].value == as_plc_holds(site.tag(name), v), name
    assert 1 <= held["heartbeat"] <= site.tag("heartbeat").hi


async def test_heatloop_run_releases_the_watchdog_and_a_kill_trips_it(
    fresh: NodePlc, tmp_path: Path
) -> None:
    """`heatloop run` on the stand-in: its UInt16 heartbeat lands, the PLC's watchdog releases
    and stays released; SIGKILL the controller and the PLC's own watchdog drives every output
    to its safe value within watchdog_s (plus headroom), on a stack that is not ours. The
    session the killed controller could not close is freed by its short session timeout."""
    text = nodeopcua_site_text(fresh.endpoint, tmp_path / "state", session_timeout_s=5.0)
    path = write_site(tmp_path, text)
    site = load_site(path)
    # No controller yet: the PLC holds its safe state and has heard no heartbeat for
    # watchdog_s, so nothing but this controller can release it (writes of an earlier test
    # may have, and its watchdog then trips within watchdog_s).
    deadline = time.monotonic() + 2 * WATCHDOG_S + 5.0
    while not ((s := fresh.state())["tripped"] and s["silent_s"] > WATCHDOG_S):
        assert time.monotonic() < deadline, f"the PLC holds released with no controller: {s}"
        await asyncio.sleep(0.1)
    ctl = ControllerProc(path, "controller")
    try:
        deadline = time.monotonic() + 30.0
        while fresh.state()["tripped"]:
            assert ctl.proc.poll() is None, ctl.tail()
            assert time.monotonic() < deadline, f"watchdog never released:\n{ctl.tail()}"
            await asyncio.sleep(0.1)
        trips = fresh.state()["trips"]
        # Released means it holds: 3 watchdog periods without a trip, the heartbeat moving.
        beats = set()
        end = time.monotonic() + 3 * WATCHDOG_S
        while time.monotonic() < end:
            s = fresh.state()
            assert not s["tripped"] and s["trips"] == trips, f"{s}\n{ctl.tail()}"
            beats.add(s["heartbeat"])
            await asyncio.sleep(0.1)
        assert len(beats) >= 3, beats
        assert fresh.state()["values"]["plc_watchdog_tripped"] is False
        killed_s = ctl.kill9()
        while not (s := fresh.state())["tripped"]:
            # generous: the watchdog's own period, its 20 ms poll, a loaded machine
            assert time.monotonic() - killed_s < WATCHDOG_S + 5.0, s
            await asyncio.sleep(0.05)
        assert s["trips"] == trips + 1
        for t in site.outputs:
            assert s["applied"][t.name] == as_plc_holds(t, t.safe), (t.name, s["applied"])
            assert s["values"][t.name] == as_plc_holds(t, t.safe), (t.name, s["values"])
        assert s["values"]["plc_watchdog_tripped"] is True
        assert s["sessions"]["max_open"] <= 1, s["sessions"]
        # the PLC frees the dead controller's session after session_timeout_s (5 s)
        s = await sessions_closed(fresh, within_s=5.0 + 10.0)
        assert s["closed"].get("Timeout") == 1, s
    finally:
        ctl.cleanup()


@pytest.mark.parametrize(
    ("fault", "attempts"), [("refuse_subscriptions", 10), ("ignore_subscriptions", 3)]
)
async def test_failed_connects_leave_no_session_open(
    fresh: NodePlc, tmp_path: Path, fault: str, attempts: int
) -> None:
    """Connects that fail after the session exists (CreateSubscription refused, or never
    answered so the connect is abandoned) leave no session behind: the PLC never sees two
    sessions of ours and never answers BadTooManySessions (it allows two); then one connect
    works and closing it leaves none."""
    site = site_for(fresh, tmp_path, subscribe=True, session_timeout_s=3600.0)
    fresh.ask(cmd="fault", name=fault)
    clock = Clock()
    async with transport(site, clock) as tx:
        deadline = time.monotonic() + 60.0
        while (s := fresh.state()["sessions"])["created"] < attempts:
            assert s["max_open"] <= 1 and s["refused"] == 0, s
            assert time.monotonic() < deadline, f"{s['created']} connects in 60 s: {s}"
            await tx.connect()
            assert tx.health.state.value != "ok"
            clock.t += 600.0
            await asyncio.sleep(0.05)
        s = await sessions_closed(fresh)
        assert s["max_open"] <= 1 and s["refused"] == 0, s
        assert s["created"] == attempts, s  # each attempt did get as far as a session
        fresh.ask(cmd="fault", name="none")
        assert await connected(tx, clock), tx.health.last_error
        assert (await tx.read_inputs())["it_supply_temp"].quality is Quality.GOOD
        assert fresh.state()["sessions"]["open"] == 1
    s = await sessions_closed(fresh)
    assert s["max_open"] <= 1 and s["refused"] == 0, s


async def sessions_closed(plc: NodePlc, within_s: float = 5.0) -> dict[str, Any]:
    """The stand-in's session counts once none is open (a close may finish after connect()
    returned); fails if one stays open."""
    deadline = time.monotonic() + within_s
    while (s := plc.state()["sessions"])["open"] != 0:
        assert time.monotonic() < deadline, f"a session stays open: {s}"
        await asyncio.sleep(0.05)
    return s


# ---- security: the PLC's certificate must be trusted ----


@pytest.fixture(scope="module")
def secure_plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodePlc]:
    folder = tmp_path_factory.mktemp("node-plc-secure")
    text = nodeopcua_site_text("opc.tcp://127.0.0.1:1/", folder / "state")
    p = NodePlc(folder, text, "encrypt")
    try:
        yield p
    finally:
        p.close()


SECURE = "Basic256Sha256_SignAndEncrypt"


async def test_an_untrusted_plc_certificate_is_refused_until_moved_to_trusted(
    secure_plc: NodePlc, tmp_path: Path
) -> None:
    """With security, the stand-in's self-signed certificate is refused (no session, saved in
    pki/plc/rejected/); one `mv` into pki/plc/trusted/ and the next connect reads good."""
    secure_plc.ask(cmd="reset")
    site = site_for(secure_plc, tmp_path, security=SECURE)
    pki = site.state_dir / "pki" / "plc"
    clock = Clock()
    async with transport(site, clock) as tx:
        assert not await connected(tx, clock, within_s=2.0)
        assert secure_plc.state()["sessions"]["created"] == 0  # refused before any session
        rejected = sorted((pki / "rejected").iterdir())
        assert len(rejected) == 1, rejected
        (pki / "trusted").mkdir(parents=True, exist_ok=True)
        rejected[0].rename(pki / "trusted" / rejected[0].name)
        assert await connected(tx, clock), tx.health.last_error
        img = await tx.read_inputs()
        assert all(img[t.name].quality is Quality.GOOD for t in site.inputs), img
    assert secure_plc.state()["sessions"]["open"] == 0


async def test_a_pinned_plc_certificate_is_trusted(secure_plc: NodePlc, tmp_path: Path) -> None:
    """`server_certificate` names the PLC's certificate (PEM, relative to the site file):
    the first connect is trusted, nothing lands in rejected/."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(secure_plc.certificate, tmp_path / "plc.pem")
    site = site_for(secure_plc, tmp_path, security=SECURE, server_certificate="plc.pem")
    async with transport(site) as tx:
        assert await connected(tx), tx.health.last_error
        assert (await tx.read_inputs())["it_supply_temp"].quality is Quality.GOOD
    rejected = site.state_dir / "pki" / "plc" / "rejected"
    assert not rejected.exists() or not any(rejected.iterdir())


async def test_a_different_certificate_in_trusted_does_not_admit_the_plc(
    secure_plc: NodePlc, tmp_path: Path
) -> None:
    """Trust is by identity: another self-signed certificate with the stand-in's subject and
    application URI in trusted/ does not make the stand-in's own trusted."""
    site = site_for(secure_plc, tmp_path, security=SECURE)
    trusted = site.state_dir / "pki" / "plc" / "trusted"
    trusted.mkdir(parents=True, exist_ok=True)
    (trusted / "impostor.der").write_bytes(impostor_certificate(secure_plc.certificate))
    clock = Clock()
    async with transport(site, clock) as tx:
        assert not await connected(tx, clock, within_s=2.0)
    assert secure_plc.state()["sessions"]["open"] == 0
    assert any((site.state_dir / "pki" / "plc" / "rejected").iterdir())


def impostor_certificate(real_pem: Path) -> bytes:
    """A DER certificate with the subject and SubjectAltName of `real_pem` but a key of its
    own: what a man in the middle would present."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding

    real = x509.load_pem_x509_certificate(real_pem.read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    san = real.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)
