"""`heatloop commission`: step through every interlock test and the PLC watchdog proof test on a
running controller, measure each response at the PLC, and file a signed record.

Theory of operation. The tool is a *client*: it never writes the PLC. It acts only through the
controller's command channel (input forces, resets, reject, the heartbeat hold, filing the
record) and, with `--sim`, through the simulated PLC's fault interface; it observes through its
own read-only PLC connection and the controller's status (controller.commission_io). The plan
(which steps, what each must show) and the judgement (pass or fail, from the observations) come
from controller.commission_plan, which is pure; the record's seal and reports from
controller.commission_record.

Each step: show it; wait for its pre-conditions; apply the cause (sim fault, input force, or
the engineer in the field); observe until every expected effect and feedback is seen or its time
is up; judge; restore the cause; reset the latch through the reset path once its condition
holds; wait until the plant is back to normal. A step that fails, an abort (Ctrl-C or Enter
while waiting), a PLC link lost mid-step or an exception stop the run the same way: every cause
this run applied is taken back (faults cleared, forces released, the heartbeat hold ended),
latches whose condition holds are reset, and the plant is left in reject (heat to the dry
cooler) until a person clears it with `heatloop reject off`. The record is filed in every case.

Progress is kept in `<report dir>/.run-<site>.json` after every step (atomic writes), so a run
cut short (killed, aborted) can be continued with `--resume`; finished steps are not repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import json
import math
import os
import platform
import re
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.channel import NoController
from controller.commission_io import ControllerLink, Observer, SimLink, Terminal, live_text
from plc_io.site import Site

FORMAT = "heatloop-commissioning/1"
WD = "WD"
FORCE_MINUTES = 3.0  # an input force's expiry: it ends by itself if the tool dies
LINK_LOST_S = 1.0  # the observer's PLC reads failing this long mid-step: the link is lost
CONTROLLER_LOST_S = 5.0  # no controller status for this long mid-step: it stopped answering
RAMP_EVERY_S = 0.25
# A drifting cause (a ramp, a person warming a sensor) crosses its limit with noise: it counts as
# present from the start of a run of readings that shows it this long without a break.
CAUSE_STEADY_S = 0.5
RESET_RETRY_S = 1.0
# The safe stop tries the resets this long (a leak rope takes a while to read dry) …
SAFE_STOP_RESET_S = 30.0
# … and trusts "nothing latched" only from a status read this long after the take-back.
SETTLE_S = 2.0
WD_SAFE_SEEN_S = 0.5  # the PLC seen safe this long before the hold is ended
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
PURPOSES = {"handover": "handover", "proof-test": "proof test"}
RESULTS = ("passed", "failed", "aborted", "skipped", "not_testable")


def step_ids() -> list[str]:
    """Every step id in run order: the rules as the engine runs them, then the watchdog."""
    from interlocks.rules import RULES

    return [r.id for r in RULES] + [WD]


def parse_only(text: str | None) -> list[str] | None:
    """`--only IL-04,WD` as ids in run order; ValueError naming an unknown id and the valid ones."""
    if text is None:
        return None
    valid = step_ids()
    wanted = [p.strip() for p in text.split(",") if p.strip()]
    if not wanted:
        raise ValueError(f"--only {text!r}: expected step ids ({', '.join(valid)})")
    unknown = [w for w in wanted if w not in valid]
    if unknown:
        raise ValueError(
            f"--only: unknown step id {', '.join(unknown)}; expected ids from {', '.join(valid)}"
        )
    return [i for i in valid if i in wanted]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the run's progress file (--resume) ----


def progress_path(report_dir: Path, site_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", site_name)[:100] or "site"
    return report_dir / f".run-{safe}.json"


def save_progress(path: Path, progress: Mapping[str, Any]) -> None:
    """Write the progress atomically (a crash leaves the old file or the new one, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".run-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(progress, f, indent=1, allow_nan=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ResumeError(ValueError):
    """`--resume` cannot continue (one line: what and why)."""


def load_progress(path: Path, site_sha256: str, engineer: str) -> dict[str, Any]:
    """The unfinished run to continue; ResumeError when there is none or it is another's."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResumeError(f"--resume: no run to continue ({path} does not exist)") from None
    except (OSError, ValueError) as e:
        raise ResumeError(f"--resume: {path}: unreadable ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        raise ResumeError(f"--resume: {path}: not a run's progress file")
    if data.get("finished"):
        raise ResumeError(f"--resume: the last run {data.get('run_id')} is finished; start anew")
    if data.get("site_sha256") != site_sha256:
        raise ResumeError(
            f"--resume: the site file changed since run {data.get('run_id')} started "
            f"(sha256 {str(data.get('site_sha256'))[:12]}…, now {site_sha256[:12]}…); start anew"
        )
    if data.get("engineer") != engineer:
        raise ResumeError(
            f"--resume: run {data.get('run_id')} belongs to engineer {data.get('engineer')!r}, "
            f"not {engineer!r}; start anew or resume as that engineer"
        )
    return data


def done_steps(progress: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Steps a resumed run does not repeat: those that came to a verdict."""
    out: dict[str, dict[str, Any]] = {}
    for s in progress.get("steps", []):
        if isinstance(s, dict) and s.get("result") in ("passed", "failed", "not_testable"):
            out[str(s.get("id"))] = s
    return out


# ---- options ----


@dataclass(frozen=True)
class Options:
    site_path: Path
    sim: bool
    auto: bool
    only: list[str] | None
    method: str  # "sim" | "forced" | "physical"
    report_dir: Path
    engineer: str
    purpose: str  # "handover" | "proof test"
    resume: bool
    comment: str
    bypass_reason: str | None
    timeout_s: float


class StepStop(Exception):
    """The step ends early: aborted by the engineer, or the PLC link lost (`result`, `why`)."""

    def __init__(self, result: str, why: str) -> None:
        super().__init__(why)
        self.result, self.why = result, why


def outcome_of(results: Sequence[Mapping[str, Any]], planned: int) -> str:
    kinds = [r.get("result") for r in results]
    if "aborted" in kinds:
        return "aborted"
    if "failed" in kinds:
        return "failed"
    if len(results) < planned or "skipped" in kinds or "passed" not in kinds:
        return "incomplete"
    return "passed"


def summary_of(results: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {k: sum(1 for r in results if r.get("result") == k) for k in RESULTS}


def bare_result(
    step: Any,
    method: str,
    result: str,
    failures: Sequence[str] = (),
    comment: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """A step result the runner writes itself (nothing was judged): skipped, not testable,
    stopped before or during the cause."""
    now = time.time()
    d: dict[str, Any] = {
        "id": step.id,
        "kind": step.kind,
        "hazard": step.hazard,
        "cause": step.cause_text,
        "effect": step.effect_text,
        "method": str(method),
        "applied": "",
        "required_s": step.required_s,
        "response_s": None,
        "effects": [],
        "feedback": [],
        "rule_active": False,
        "latched": False,
        "mode_before": None,
        "mode_during": None,
        "reset": {"needed": bool(step.latching), "done": False, "how": ""},
        "restored": True,
        "back_to_normal": False,
        "mode_after": None,
        "result": result,
        "failures": list(failures),
        "comment": comment,
        "started_wall": now,
        "ended_wall": now,
    }
    d.update(extra)
    return d


@dataclass
class Applied:
    """What this run has changed and must take back."""

    faults: list[tuple[str, str]] = field(default_factory=list)
    forces: dict[str, dict[str, Any]] = field(default_factory=dict)  # tag -> forces_used entry
    hold: bool = False
    ramps: list[asyncio.Task[None]] = field(default_factory=list)
    ramped: list[Any] = field(default_factory=list)  # the ramped sim actions in force
    levels: dict[tuple[str, str], float] = field(default_factory=dict)  # their offsets now


class Runner:
    def __init__(self, site: Site, opts: Options, term: Terminal) -> None:
        from controller import commission_plan as cp

        self.cp = cp
        self.site = site
        self.opts = opts
        self.term = term
        self.method = cp.Method(opts.method)
        self.link = ControllerLink(site)
        self.observer = Observer(site, self.link, cp.Observation)
        self.sim: SimLink | None = SimLink(site) if opts.sim else None
        self.abort = asyncio.Event()
        self.applied = Applied()
        self.forces_used: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.left_in_reject: str | None = None
        self.margin_s = 1.0 + 2 * site.scan.period_s
        self.site_sha = file_sha256(opts.site_path)
        self.run_id = uuid.uuid4().hex
        self.started_wall = time.time()
        self.bypasses_at_start: list[dict[str, Any]] = []
        self.only = opts.only  # a resumed run keeps the steps it was started with
        self.progress_file = progress_path(opts.report_dir, site.site.name)

    # ---- plumbing ----

    def _on_sigint(self) -> None:
        if not self.abort.is_set():
            self.term.say("\nCtrl-C: aborting the step; restoring what this run applied …")
        self.abort.set()

    async def _cmd(self, cmd: str, args: Mapping[str, object], reason: str = "") -> dict[str, Any]:
        try:
            return await self.link.call(cmd, args, reason)
        except NoController as e:
            return {"ok": False, "why": str(e)}

    def _reason(self, step_id: str) -> str:
        return f"commissioning {self.run_id} {step_id}"

    def _check_stop(self, step: Any, since_ok: list[float]) -> None:
        """StepStop on an abort, or when the PLC link is lost mid-step (not IL-08's own cause)."""
        if self.abort.is_set():
            raise StepStop("aborted", "aborted by the engineer (Ctrl-C or Enter)")
        st = self.observer.status_t
        if st is not None and time.monotonic() - st > CONTROLLER_LOST_S:
            raise StepStop(
                "failed",
                f"the controller stopped answering mid-step ({self.observer.status_error})",
            )
        if step.id == "IL-08":
            return
        o = self.observer.latest
        if o is None:
            return
        if o.plc_ok:
            since_ok[0] = o.t
        elif o.t - since_ok[0] >= LINK_LOST_S:
            raise StepStop("failed", "PLC link lost mid-step (the tool's own PLC reads failed)")

    async def _wait(
        self,
        step: Any,
        until: Callable[[Any], bool],
        timeout_s: float,
        what: Callable[[Any], str],
        tags: Sequence[str],
        check: bool = True,
    ) -> bool:
        """Observe until `until(obs)` or `timeout_s`; the live line shows `what(obs)`."""
        deadline = time.monotonic() + timeout_s
        since_ok = [time.monotonic()]
        while True:
            o = await self.observer.next(1.0)
            if check:
                self._check_stop(step, since_ok)
            elif self.abort.is_set():
                return False
            if o is not None and until(o):
                return True
            if time.monotonic() >= deadline:
                return False
            note = what(o)
            self.term.live((note + " | " if note else "") + live_text(o, tags))

    def _tags(self, step: Any) -> list[str]:
        tags: list[str] = []
        for f in step.forced or ():
            tags.append(f.tag)
        for a in step.sim or ():
            if a.target in {t.name for t in self.site.inputs}:
                tags.append(a.target)
            elif a.name == "leak":
                tags.append(f"leak_{a.target}")
        tags += [e.output for e in step.expects] + [f.tag for f in step.feedback]
        return list(dict.fromkeys(tags))

    # ---- start, finish ----

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        try:
            return await self._run()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
            await self.observer.close()
            if self.sim is not None:
                await self.sim.close()

    async def _run(self) -> int:
        opts, cp = self.opts, self.cp
        try:
            st = await self.link.status()
        except NoController as e:
            self.term.error(f"heatloop: {e}")
            return EXIT_RUNTIME
        theirs = st.get("site_sha256")
        if isinstance(theirs, str) and theirs != self.site_sha:
            self.term.error(
                f"heatloop: the controller runs another site file (sha256 {theirs[:12]}…) than "
                f"{opts.site_path} ({self.site_sha[:12]}…): restart it on this file first"
            )
            return EXIT_USAGE
        done: dict[str, dict[str, Any]] = {}
        if opts.resume:
            try:
                prog = load_progress(self.progress_file, self.site_sha, opts.engineer)
            except ResumeError as e:
                self.term.error(f"heatloop: {e}")
                return EXIT_USAGE
            target = "sim" if opts.sim else "live"
            if (prog.get("method"), prog.get("target")) != (str(self.method), target):
                self.term.error(
                    f"heatloop: --resume: run {prog.get('run_id')} used method "
                    f"{prog.get('method')} on {prog.get('target')}; give the same options "
                    f"(now {self.method} on {target})"
                )
                return EXIT_USAGE
            only = prog.get("only")
            self.only = [str(i) for i in only] if isinstance(only, list) else None
            self.run_id = str(prog["run_id"])
            self.started_wall = float(prog.get("started_wall", self.started_wall))
            self.forces_used = list(prog.get("forces_used", []))
            self.bypasses_at_start = list(prog.get("bypasses_at_start", []))
            done = done_steps(prog)
        else:
            self.bypasses_at_start = _bypasses(st)
        try:
            steps = cp.plan(self.site, self.only, self.method)
        except cp.PlanError as e:
            self.term.error(f"heatloop: {e}")
            return EXIT_USAGE
        try:
            if self.sim is not None:
                await self.sim.connect()
            await self.observer.start()
        except Exception as e:
            self.term.error(f"heatloop: cannot reach the PLC or its simulator: {e}")
            return EXIT_RUNTIME
        self._intro(steps, done)
        stopped = False
        for step in steps:
            if step.id in done:
                self.results.append(done[step.id])
                continue
            if stopped:
                self.results.append(
                    bare_result(
                        step,
                        self._method(step),
                        "skipped",
                        comment="not run: the run stopped earlier",
                    )
                )
                continue
            res, stop = await self._guarded_step(step)
            self.results.append(res)
            self._save(finished=False)
            if stop:
                stopped = True
        return await self._finish(len(steps))

    def _intro(self, steps: Sequence[Any], done: Mapping[str, Any]) -> None:
        t = self.term
        target = "simulated PLC" if self.opts.sim else "live plant"
        t.say(f"commissioning {self.site.site.name!r} ({target}), run {self.run_id}")
        t.say(f"engineer {self.opts.engineer}; method {self.method}; purpose {self.opts.purpose}")
        t.say(f"steps: {', '.join(s.id for s in steps)}")
        if done:
            t.say(f"resumed: {', '.join(done)} already done, not repeated")
        if self.bypasses_at_start:
            t.say("bypasses standing now (their rules cannot be tested while bypassed):")
            for b in self.bypasses_at_start:
                t.say(f"  {b.get('rule')}: by {b.get('who')}, {b.get('reason')!r}")
        else:
            t.say("no bypass stands")

    def _method(self, step: Any) -> str:
        return str(self.cp.Method.HEARTBEAT_HOLD if step.kind == "watchdog" else self.method)

    def _save(self, finished: bool) -> None:
        prog = {
            "run_id": self.run_id,
            "site": self.site.site.name,
            "site_file": str(self.opts.site_path),
            "site_sha256": self.site_sha,
            "engineer": self.opts.engineer,
            "method": str(self.method),
            "target": "sim" if self.opts.sim else "live",
            "only": self.only,
            "started_wall": self.started_wall,
            "bypasses_at_start": self.bypasses_at_start,
            "forces_used": self.forces_used,
            "steps": self.results,
            "finished": finished,
        }
        try:
            save_progress(self.progress_file, prog)
        except OSError as e:
            self.term.say(f"warning: cannot save the run's progress to {self.progress_file}: {e}")

    async def _finish(self, planned: int) -> int:
        from controller import commission_record as cr

        t, opts = self.term, self.opts
        try:
            st = await self.link.status()
        except NoController:
            st = {}
        at_end = _bypasses(st) if st else []
        start_rules = {b.get("rule") for b in self.bypasses_at_start}
        end_rules = {b.get("rule") for b in at_end}
        removed = sorted(str(r) for r in start_rules - end_rules)
        outcome = outcome_of(self.results, planned)
        signoff_reason = opts.bypass_reason
        signoff: dict[str, Any] | None = None
        if at_end and not signoff_reason and not opts.auto:
            signoff_reason = (
                await t.ask(
                    f"bypasses still stand ({', '.join(sorted(map(str, end_rules)))}): type why "
                    "you sign off anyway (Enter: do not sign)",
                    self.abort,
                )
                or ""
            ).strip() or None
        if at_end and not signoff_reason:
            t.say("not signed: a bypass still stands and no reason was given (--bypass-reason)")
            if outcome == "passed":
                outcome = "incomplete"
        else:
            name = opts.engineer
            if not opts.auto:
                answer = await t.ask(
                    f"sign off as {name}? type yes to sign (Enter: do not sign)", self.abort
                )
                if (answer or "").strip().lower() not in ("y", "yes"):
                    name = ""
            if name:
                signoff = {
                    "engineer": name,
                    "statement": (
                        f"I, {name}, ran or witnessed the steps of this record on "
                        f"{self.site.site.name} ({'simulated PLC' if opts.sim else 'live plant'})"
                        " and the results are as recorded."
                    ),
                    "wall": time.time(),
                }
            elif outcome == "passed":
                outcome = "incomplete"
        comments = opts.comment
        if self.left_in_reject:
            note = (
                f"the plant was left in reject ({self.left_in_reject}); clear it with: "
                f"heatloop reject off --site {opts.site_path} --reason TEXT"
            )
            comments = f"{comments}\n{note}".strip()
        body: dict[str, Any] = {
            "format": FORMAT,
            "run_id": self.run_id,
            "purpose": opts.purpose,
            "target": "sim" if opts.sim else "live",
            "site": {
                "name": self.site.site.name,
                "file": str(opts.site_path.resolve()),
                "sha256": self.site_sha,
            },
            "software": {"version": _version(), "python": platform.python_version()},
            "rule_table_sha256": self.cp.rule_table_hash(self.site),
            "engineer": opts.engineer,
            "os_user": getpass.getuser(),
            "started_wall": self.started_wall,
            "ended_wall": time.time(),
            "steps": self.results,
            "bypasses_at_start": self.bypasses_at_start,
            "bypasses_at_end": at_end,
            "bypasses_removed": removed,
            "bypass_signoff_reason": signoff_reason if at_end else None,
            "forces_used": self.forces_used,
            "outcome": outcome,
            "summary": summary_of(self.results),
            "comments": comments,
            "signoff": signoff,
        }
        body = _finite(body)
        # a run that came to a verdict is finished; an aborted or incomplete one may be resumed
        self._save(finished=outcome in ("passed", "failed"))
        reply = await self._cmd(
            "commission", {"record": body}, f"commissioning record {self.run_id}"
        )
        sealed = reply.get("new") if reply.get("ok") else None
        self._summary(outcome)
        if not isinstance(sealed, dict):
            paths = write_unfiled(body, opts.report_dir)
            t.say(f"the record could NOT be filed: {reply.get('why') or 'no answer'}")
            for p in paths:
                t.say(f"  written unsealed: {p}")
            return EXIT_RUNTIME
        try:
            paths = cr.write_reports(sealed, opts.report_dir)
        except (OSError, ValueError) as e:
            t.say(f"the record was filed (seq {sealed.get('seq')}) but cannot be written: {e}")
            return EXIT_RUNTIME
        t.say(f"record filed as seq {sealed.get('seq')}, hash {str(sealed.get('hash'))[:16]}…")
        for p in paths:
            t.say(f"  {p}")
        return EXIT_OK if outcome == "passed" else EXIT_USAGE

    def _summary(self, outcome: str) -> None:
        t = self.term
        t.say("")
        t.say(f"outcome: {outcome.upper()}")
        for r in self.results:
            resp = r.get("response_s")
            shown = f"{resp:.2f} s" if isinstance(resp, (int, float)) else "-"
            t.say(f"  {r['id']:<6} {r['result']:<13} response {shown:<8} {r.get('method')}")
            for f in r.get("failures") or ():
                t.say(f"         ✗ {f}")
        if self.left_in_reject:
            t.say(
                f"THE PLANT IS LEFT IN REJECT ({self.left_in_reject}); after checking it, clear "
                f"it with: heatloop reject off --site {self.opts.site_path} --reason TEXT"
            )

    # ---- one step ----

    async def _guarded_step(self, step: Any) -> tuple[dict[str, Any], bool]:
        """Run one step; any stop makes the plant safe. (result, whether the run stops)."""
        method = self._method(step)
        started = time.time()
        ctx: dict[str, Any] = {"applied": ""}
        try:
            res = await self._step(step, method, ctx)
        except StepStop as e:
            res = bare_result(
                step, method, e.result, [e.why], applied=ctx["applied"], started_wall=started
            )
            await self._make_safe(step, e.why, res)
            return res, True
        except Exception as e:  # a bug or an I/O failure: the plant is made safe all the same
            why = f"the tool failed: {type(e).__name__}: {e}"
            res = bare_result(
                step, method, "aborted", [why], applied=ctx["applied"], started_wall=started
            )
            await self._make_safe(step, why, res)
            return res, True
        if res["result"] == "failed" and not ctx.get("bypassed"):
            await self._make_safe(step, f"step {step.id} failed", res)
            return res, True
        if ctx.get("quit"):
            return res, True
        return res, False

    async def _step(self, step: Any, method: str, ctx: dict[str, Any]) -> dict[str, Any]:
        cp, t, site = self.cp, self.term, self.site
        self.observer.forget_before(self.observer.clock())  # a step judges its own reads only
        tags = self._tags(step)
        t.say("")
        t.say(f"── {step.id}: {step.hazard}")
        t.say(f"   cause:  {step.cause_text}")
        t.say(f"   effect: {step.effect_text} (within {step.required_s:g} s)")
        for e in step.expects:
            t.say(f"     expect {e.text}")
        for f in step.feedback:
            t.say(f"     then   {f.tag} {f.text} (within {f.within_s:g} s)")
        t.say(f"   method: {method}")
        t.say(f"   pre-conditions: {_precondition_text(step)}")
        why_not = _why_not(step, method)
        if why_not:
            t.say(f"   not testable by {method}: {why_not}")
            return bare_result(step, method, "not_testable", comment=why_not)
        obs = self.observer.latest
        if obs is not None and step.id in obs.bypassed:
            ctx["bypassed"] = True
            t.say(f"   FAILED: {step.id} is bypassed; end the bypass to test it")
            return bare_result(
                step, method, "failed", [f"bypassed: {step.id} cannot act while bypassed"]
            )
        if not self.opts.auto and method != str(cp.Method.PHYSICAL):
            answer = await t.ask(
                "   press Enter to apply the cause, s then Enter to skip, q then Enter to stop",
                self.abort,
            )
            if self.abort.is_set():
                raise StepStop("aborted", "aborted by the engineer before the cause")
            a = (answer or "").strip().lower()
            if a == "s":
                return bare_result(step, method, "skipped", comment="skipped by the engineer")
            if a == "q" or answer is None:
                ctx["quit"] = True
                return bare_result(step, method, "skipped", comment="run stopped by the engineer")
        t.say("   waiting for the pre-conditions …")
        ok = await self._wait(
            step,
            lambda o: not cp.preconditions(step, o, site),
            self.opts.timeout_s,
            lambda o: "missing: " + "; ".join(cp.preconditions(step, o, site)) if o else "",
            tags,
        )
        if not ok:
            missing = (
                cp.preconditions(step, self.observer.latest, site) if self.observer.latest else []
            )
            why = f"precondition never met within {self.opts.timeout_s:g} s: " + (
                "; ".join(missing) or "no PLC reading"
            )
            t.say(f"   FAILED: {why}")
            return bare_result(step, method, "failed", [why])
        if step.kind == "rule" and step.expects:
            # an effect already in place proves nothing: give the plant time to run (e.g. leave
            # DRY_COOLER_REJECT after the last step's reset), then go ahead all the same; the
            # record marks such effects "not proven"
            await self._wait(
                step,
                lambda o: (
                    len(cp.already_in_place(step, o)) < len(step.expects)
                    and not cp.preconditions(step, o, site)
                ),
                self.opts.timeout_s,
                lambda o: (
                    "waiting for the plant to run (effects already in place: "
                    + ", ".join(cp.already_in_place(step, o))
                    + ")"
                    if o
                    else ""
                ),
                tags,
            )
            if cp.preconditions(step, self.observer.latest, site):
                why = "pre-conditions lost: " + "; ".join(
                    cp.preconditions(step, self.observer.latest, site)
                )
                t.say(f"   FAILED: {why}")
                return bare_result(step, method, "failed", [why])
            shown = cp.already_in_place(step, self.observer.latest)
            if shown:
                t.say(f"   note: already in place, not proven by this step: {', '.join(shown)}")
        before = self.observer.latest
        started_wall = time.time()
        if step.kind == "watchdog":
            return await self._watchdog(step, before, started_wall, ctx, tags)
        applied, t0 = await self._apply(step, method, ctx, tags)
        t.say(f"   applied: {applied}; observing …")
        obs = await self._observe(step, method, t0, before, applied, tags)
        res = cp.judge(step, cp.Method(method), t0, obs, before, site, applied).to_json()
        res["started_wall"] = started_wall
        self._show_judged(res)
        await self._restore(step, method, res, tags)
        await self._reset_and_normal(step, res, tags)
        res["ended_wall"] = time.time()
        self._show_end(res)
        return res

    def _show_judged(self, res: Mapping[str, Any]) -> None:
        t = self.term
        t.say(
            f"   {str(res.get('result', '?')).upper()}: response {_secs(res.get('response_s'))} "
            f"(required {res.get('required_s')} s)"
        )
        for e in res.get("effects") or ():
            t.say(
                f"     {'✓' if e.get('ok') else '✗'} {e.get('output')}: as found "
                f"{e.get('as_found')!r} (expected {e.get('expected')!r}) at {_secs(e.get('at_s'))}"
            )
        for f in res.get("feedback") or ():
            t.say(
                f"     {'✓' if f.get('ok') else '✗'} {f.get('tag')}: as found "
                f"{f.get('as_found')!r} (expected {f.get('expected')}) at {_secs(f.get('at_s'))}"
            )

    def _show_end(self, res: Mapping[str, Any]) -> None:
        self.term.say(f"   → {res['result'].upper()}")
        for f in res.get("failures") or ():
            self.term.say(f"     ✗ {f}")

    async def _apply(
        self, step: Any, method: str, ctx: dict[str, Any], tags: Sequence[str]
    ) -> tuple[str, float]:
        """Apply the cause; (what was applied, t0 on the tool's monotonic clock)."""
        cp, site = self.cp, self.site
        if method == str(cp.Method.SIM):
            assert self.sim is not None
            before = self.observer.latest
            try:  # offsets from the readings as found, so a ramp ends where the plan says
                actions = cp.sim_actions(step, before, self.site)
            except cp.PlanError as e:
                raise StepStop("failed", f"cannot apply the sim cause: {e}") from None
            applied = cp.applied_text(step, cp.Method.SIM, actions)
            ctx["applied"] = applied
            ramped = [a for a in actions if a.ramp_k_per_s]
            t_call = time.monotonic()
            for a in actions:
                self.applied.faults.append((a.name, a.target))
                if not a.ramp_k_per_s:
                    await self.sim.inject(a.name, a.target, a.value)
            if not ramped:
                # the call returned; or earlier, if the PLC showed the cause before the reply came
                t0 = time.monotonic()
                seen = [o.t for o in self.observer.since(t_call) if cp.cause_present(step, o, site)]
                return applied, min([t0, *seen[:1]])
            self.applied.ramped = ramped
            self.applied.ramps.append(
                asyncio.create_task(self._ramp_to(ramped, lambda a: float(a.value)))
            )
            # a ramp: the cause starts when it is seen at the PLC inputs
            span = max(abs(a.value) / a.ramp_k_per_s for a in ramped)
            return applied, await self._cause_seen(step, span + self.opts.timeout_s, tags)
        if method == str(cp.Method.FORCED):
            parts = []
            for f in step.forced:
                reply = await self._cmd(
                    "force",
                    {"tag": f.tag, "value": f.value, "minutes": FORCE_MINUTES},
                    self._reason(step.id),
                )
                if not reply.get("ok"):
                    raise StepStop(
                        "failed", f"force {f.tag}={f.value!r} refused: {reply.get('why')}"
                    )
                entry = {
                    "tag": f.tag,
                    "value": f.value,
                    "step": step.id,
                    "set_wall": time.time(),
                    "cleared_wall": None,
                }
                self.forces_used.append(entry)
                self.applied.forces[f.tag] = entry
                parts.append(f"input force {f.tag} = {f.value!r} ({FORCE_MINUTES:g} min expiry)")
            applied = "; ".join(parts)
            ctx["applied"] = applied
            return applied, time.monotonic()
        # physical: the engineer applies it; t0 is the first observation with the cause present
        self.term.say(f"   APPLY THE CAUSE NOW: {step.physical}")
        self.term.say(f"   (waiting up to {self.opts.timeout_s:g} s; press Enter to abort)")
        ctx["applied"] = f"physical: {step.physical}"
        with self.term.line_reader() as watch:
            t0 = await self._cause_seen(step, self.opts.timeout_s, tags, watch.pressed)
        return ctx["applied"], t0

    async def _cause_seen(
        self, step: Any, timeout_s: float, tags: Sequence[str], enter: asyncio.Event | None = None
    ) -> float:
        cp, site = self.cp, self.site
        deadline = time.monotonic() + timeout_s
        since_ok = [time.monotonic()]
        onset: float | None = None
        while True:
            o = await self.observer.next(1.0)
            self._check_stop(step, since_ok)
            if enter is not None and enter.is_set():
                raise StepStop(
                    "aborted", "aborted by the engineer (Enter) while waiting for the cause"
                )
            if o is not None and cp.cause_present(step, o, site):
                onset = o.t if onset is None else onset
                if o.t - onset >= CAUSE_STEADY_S:
                    return float(onset)
            else:
                onset = None
            if time.monotonic() >= deadline:
                raise StepStop(
                    "failed", f"the cause was not seen at the PLC within {timeout_s:g} s"
                )
            self.term.live("waiting for the cause | " + live_text(o, tags))

    async def _ramp_to(self, actions: Sequence[Any], goal: Callable[[Any], float]) -> None:
        """Move the step's ramped sim offsets together toward `goal(action)`, re-injecting in
        steps of at most `ramp_k_per_s` × one tick (tick ≤ one scan): a sensor drifting, which
        the controller's rate check accepts, not a jump it would take for a broken sensor."""
        assert self.sim is not None
        tick = min(RAMP_EVERY_S, self.site.scan.period_s)
        while True:
            done = True
            for a in actions:
                key = (a.name, a.target)
                cur = self.applied.levels.get(key, 0.0)
                want = goal(a)
                most = a.ramp_k_per_s * tick
                nxt = want if abs(want - cur) <= most else cur + math.copysign(most, want - cur)
                await self.sim.inject(a.name, a.target, nxt)
                self.applied.levels[key] = nxt
                done = done and nxt == want
            if done:
                return
            await asyncio.sleep(tick)

    async def _observe(
        self, step: Any, method: str, t0: float, before: Any, applied: str, tags: Sequence[str]
    ) -> list[Any]:
        cp, site = self.cp, self.site
        horizon = max([step.required_s, *(f.within_s for f in step.feedback)]) + self.margin_s
        if step.id == "IL-08":  # judged when the link is back: the outage itself takes time
            horizon = max(horizon, self.opts.timeout_s)
        deadline = t0 + horizon
        since_ok = [time.monotonic()]
        last_judge = -math.inf
        m = cp.Method(method)
        while True:
            o = await self.observer.next(1.0)
            self._check_stop(step, since_ok)
            now = time.monotonic()
            if now >= deadline:
                break
            if now - last_judge >= 0.25:  # stop early once everything is seen
                last_judge = now
                seen = self.observer.since(t0)
                if seen and cp.judge(step, m, t0, seen, before, site, applied).result == "passed":
                    break
            self.term.live(f"t+{now - t0:5.1f} s | " + live_text(o, tags))
        return self.observer.since(t0)

    async def _restore(
        self, step: Any, method: str, res: dict[str, Any], tags: Sequence[str]
    ) -> None:
        cp, site = self.cp, self.site
        if method == str(cp.Method.PHYSICAL):
            self.term.say(f"   RESTORE NOW: {step.restore_text}")
        else:
            await self._take_back()
        gone = await self._wait(
            step,
            lambda o: not cp.cause_present(step, o, site),
            self.opts.timeout_s,
            lambda o: "waiting for the cause to go",
            tags,
        )
        res["restored"] = gone
        if not gone:
            res["failures"].append(
                f"cause still present {self.opts.timeout_s:g} s after it was taken back"
            )
            res["result"] = "failed"

    async def _take_back(self) -> None:
        """Clear every sim fault, release every force and end the heartbeat hold of this run."""
        for task in self.applied.ramps:
            task.cancel()
        for task in self.applied.ramps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.applied.ramps = []
        if self.sim is not None and self.applied.ramped:
            # back down the same way before clearing: a step back would trip the rate check
            ramped, self.applied.ramped = self.applied.ramped, []
            bound = (
                max(
                    abs(self.applied.levels.get((a.name, a.target), 0.0)) / a.ramp_k_per_s
                    for a in ramped
                )
                + 5.0
            )
            try:
                await asyncio.wait_for(self._ramp_to(ramped, lambda a: 0.0), bound)
            except Exception as e:  # cleared below all the same
                self.term.say(f"   ramping back failed: {type(e).__name__}: {e}")
            self.applied.levels.clear()
        if self.sim is not None:
            for name, target in list(self.applied.faults):
                try:
                    await self.sim.clear(name, target)
                    self.applied.faults.remove((name, target))
                except Exception as e:
                    self.term.say(f"   could not clear sim fault {name}/{target}: {e}")
        for tag, entry in list(self.applied.forces.items()):
            reply = await self._cmd("force", {"tag": tag, "release": True})
            if reply.get("ok") or "not forced" in str(reply.get("why")):
                entry["cleared_wall"] = time.time()
                del self.applied.forces[tag]
            else:
                self.term.say(f"   could not release the force on {tag}: {reply.get('why')}")
        if self.applied.hold:
            reply = await self._cmd("watchdog_test", {"seconds": 0}, "commissioning: hold ended")
            if reply.get("ok"):
                self.applied.hold = False

    async def _reset_and_normal(self, step: Any, res: dict[str, Any], tags: Sequence[str]) -> None:
        cp = self.cp
        o = self.observer.latest
        needed = bool(step.latching) or (o is not None and step.id in o.latched)
        reset = {"needed": needed, "done": False, "how": ""}
        if needed:
            reset["how"] = f"reset {step.id} through the command channel"
            reset["done"] = await self._reset(step, self.opts.timeout_s)
            if not reset["done"]:
                res["failures"].append(
                    f"{step.id} could not be reset within {self.opts.timeout_s:g} s"
                )
                res["result"] = "failed"
        res["reset"] = reset
        back = await self._wait(
            step,
            lambda o: not cp.normal(o),
            self.opts.timeout_s,
            lambda o: "back to normal? " + "; ".join(cp.normal(o)) if o else "",
            tags,
        )
        res["back_to_normal"] = back
        res["mode_after"] = self.observer.latest.mode if self.observer.latest else None
        if not back:
            why = (
                "; ".join(cp.normal(self.observer.latest)) if self.observer.latest else "no reading"
            )
            res["failures"].append(f"plant did not return to normal: {why}")
            res["result"] = "failed"

    async def _reset(self, step: Any, timeout_s: float) -> bool:
        """Ask for the reset until the controller takes it (its condition holds) and the latch
        is gone; False after `timeout_s`. StepStop on an abort, a lost link or controller."""
        deadline = time.monotonic() + timeout_s
        accepted = False
        since_ok = [time.monotonic()]
        while time.monotonic() < deadline:
            self._check_stop(step, since_ok)
            if not accepted:
                reply = await self._cmd(
                    "reset",
                    {"rules": [step.id]},
                    f"commissioning {self.run_id} {step.id}: restored",
                )
                accepted = bool(reply.get("ok"))
            o = await self.observer.next(1.0)
            if accepted and o is not None and step.id not in o.latched:
                return True
            if not accepted:
                self.term.live(f"reset {step.id}: {reply.get('why')}")
                await asyncio.sleep(RESET_RETRY_S)
        return False

    async def _watchdog(
        self, step: Any, before: Any, started_wall: float, ctx: dict[str, Any], tags: Sequence[str]
    ) -> dict[str, Any]:
        """Hold the heartbeat, see the PLC go safe, end the hold, see it release."""
        cp, site, t = self.cp, self.site, self.term
        plc = site.plc
        seconds = min(plc.watchdog_s + plc.watchdog_holdoff_s + 5.0, max(30.0, 4 * plc.watchdog_s))
        reply = await self._cmd("watchdog_test", {"seconds": seconds}, self._reason(step.id))
        if not reply.get("ok"):
            raise StepStop("failed", f"watchdog_test refused: {reply.get('why')}")
        t0 = time.monotonic()
        self.applied.hold = True
        ctx["applied"] = f"heartbeat held for up to {seconds:g} s"
        t.say(f"   applied: {ctx['applied']}; waiting for the PLC's safe state …")
        since_ok = [t0]
        safe_since: float | None = None
        give_up = t0 + plc.watchdog_s + 2.0 + self.margin_s
        while True:
            o = await self.observer.next(1.0)
            self._check_stop(step, since_ok)
            now = time.monotonic()
            if o is not None and self._plc_safe(o):
                safe_since = safe_since if safe_since is not None else now
                if now - safe_since >= WD_SAFE_SEEN_S:
                    break
            else:
                safe_since = None
            if now >= give_up:
                break
            t.live(f"t+{now - t0:5.1f} s | " + live_text(o, tags))
        reply = await self._cmd("watchdog_test", {"seconds": 0}, self._reason(step.id))
        t_resume = time.monotonic()
        if reply.get("ok"):
            self.applied.hold = False
        t.say("   heartbeat resumed; watching the PLC release …")
        release_by = t_resume + plc.watchdog_holdoff_s + 2.0 + self.margin_s
        while time.monotonic() < release_by:
            o = await self.observer.next(1.0)
            self._check_stop(step, since_ok)
            if (
                o is not None
                and not self._plc_safe(o)
                and o.inputs.get("plc_watchdog_tripped") is False
            ):
                await asyncio.sleep(0.5)  # a few more readings after the release
                break
            t.live(f"t+{time.monotonic() - t0:5.1f} s | " + live_text(o, tags))
        obs = self.observer.since(t0)
        res = cp.judge_watchdog(step, t0, t_resume, obs, before, site).to_json()
        res["applied"] = ctx["applied"]
        res["started_wall"] = started_wall
        self._show_judged(res)
        res["restored"] = not self.applied.hold
        await self._reset_and_normal(step, res, tags)
        res["ended_wall"] = time.time()
        self._show_end(res)
        return res

    def _plc_safe(self, o: Any) -> bool:
        """The PLC says its watchdog holds the safe state (or every output reads its safe value)."""
        tripped = o.inputs.get("plc_watchdog_tripped")
        if tripped is not None:
            return tripped is True
        safe = {t.name: t.safe for t in self.site.outputs if t.safe is not None}
        return bool(safe) and all(o.outputs.get(k) == v for k, v in safe.items())

    # ---- the safe stop ----

    async def _make_safe(self, step: Any, why: str, res: dict[str, Any]) -> None:
        """Take back what this run applied, reset latches whose condition holds, leave the plant
        in reject. Runs to its end even after a second Ctrl-C; every wait is bounded."""
        t = self.term
        t.say(f"   STOPPING SAFELY: {why}")
        try:
            await self._take_back()
        except Exception as e:
            t.say(f"   taking back failed: {type(e).__name__}: {e}")
        res["restored"] = not (self.applied.faults or self.applied.forces or self.applied.hold)
        # latches whose condition holds (the cause taken back is gone) are reset; others stay.
        # A trip the step raised just before the stop may not be in the status read yet: no
        # latch counts as none only in a status read SETTLE_S after the take-back.
        taken_back = time.monotonic()
        deadline = taken_back + min(SAFE_STOP_RESET_S, self.opts.timeout_s)
        tried: dict[str, str] = {}
        while time.monotonic() < deadline:
            o = self.observer.latest
            latched = sorted(o.latched) if o is not None else []
            settled = o is not None and (o.status_t or 0.0) >= taken_back + SETTLE_S
            if not latched and settled:
                break
            for rid in latched:
                reply = await self._cmd(
                    "reset", {"rules": [rid]}, f"commissioning {self.run_id}: stopped"
                )
                tried[rid] = "accepted" if reply.get("ok") else str(reply.get("why"))
            await asyncio.sleep(RESET_RETRY_S)
        for rid, how in tried.items():
            t.say(f"   reset {rid}: {how}")
        reply = await self._cmd(
            "reject", {"on": True}, f"commissioning {self.run_id} stopped: {why}"[:400]
        )
        if reply.get("ok"):
            self.left_in_reject = f"run {self.run_id}: {why}"
            t.say("   the plant is left in REJECT (all heat to the dry cooler)")
        else:
            t.say(f"   reject could NOT be requested: {reply.get('why')}")
        res["comment"] = (
            (res.get("comment") or "")
            + (" " if res.get("comment") else "")
            + ("plant left in reject" if reply.get("ok") else "reject request failed")
        )
        res["ended_wall"] = time.time()


def _precondition_text(step: Any) -> str:
    """What the plan's pre-conditions ask, in words (they are checked on each observation)."""
    if step.kind == "watchdog":
        return (
            "PLC link up, the controller's status fresh, no interlock active, and some output "
            "away from its safe value (so the fallback can be seen)"
        )
    tags = ", ".join(step.cause_tags)
    return (
        "PLC link up, the controller's status fresh, no interlock active or latched, "
        f"{step.id} not bypassed, a running mode (not LEAK_TRIP, STARTUP or MAINTENANCE)"
        + (f", {tags} valid" if tags else "")
        + ", the cause not present yet"
    )


def _secs(v: object) -> str:
    return f"{v:.2f} s" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _why_not(step: Any, method: str) -> str:
    why = step.why_not.get(method) if step.why_not else None
    if why:
        return str(why)
    if step.kind == "watchdog":
        return ""
    if method == "sim" and not step.sim:
        return "no simulated fault makes this cause"
    if method == "forced" and not step.forced:
        return "no input force makes this cause"
    if method == "physical" and not step.physical:
        return "no field action is described for this cause"
    return ""


def _bypasses(st: Mapping[str, Any]) -> list[dict[str, Any]]:
    il = st.get("interlocks")
    rows = il.get("bypassed") if isinstance(il, Mapping) else None
    out = []
    for b in rows or ():
        if isinstance(b, Mapping):
            out.append(
                {
                    "rule": b.get("rule"),
                    "who": b.get("who"),
                    "reason": b.get("reason"),
                    "until_wall": b.get("until_wall"),
                }
            )
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("heatloop")
    except PackageNotFoundError:
        return "0+unknown"


def _finite(obj: Any) -> Any:
    """JSON without NaN: a non-finite number in a result becomes null (the record is strict)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_finite(v) for v in obj)
    return obj


def write_unfiled(body: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """The body as `<site>-<run>-UNFILED.json/.md` when the controller did not file it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    site = re.sub(r"[^A-Za-z0-9._-]", "_", str(body.get("site", {}).get("name", "site")))
    stem = out_dir / f"{site}-{str(body.get('run_id'))[:12]}-UNFILED"
    js = stem.with_suffix(".json")
    js.write_text(json.dumps(body, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    md = stem.with_suffix(".md")
    try:
        from controller.commission_record import to_markdown

        text = to_markdown(body)
    except Exception:
        lines = [
            f"# UNFILED commissioning record {body.get('run_id')}",
            "",
            "This record was NOT filed in the controller's journal: it is neither sealed nor "
            "signed.",
            "",
            f"outcome: {body.get('outcome')}",
        ]
        lines += [f"- {s.get('id')}: {s.get('result')}" for s in body.get("steps", [])]
        text = "\n".join(lines) + "\n"
    md.write_text("**UNFILED: not sealed, not signed**\n\n" + text, encoding="utf-8")
    return [js, md]


def run_commission(site: Site, opts: Options, term: Terminal | None = None) -> int:
    """The CLI's entry: the whole run in its own event loop."""
    term = term or Terminal()
    import logging

    from controller.logs import configure

    # the libraries' and the transport's logs to stderr, warnings only: stdout is the person's
    configure(json=False, level=logging.WARNING)

    async def main() -> int:
        return await Runner(site, opts, term).run()

    return asyncio.run(main())
