"""Plant speed: simulated seconds per wall second for `step`, against a same-run baseline."""

from __future__ import annotations

import time
import timeit

import numpy as np

from plc_io.plant_config import PlantConfig
from sim import plant
from sim.local import local_policy
from sim.run import simulate

_TARGET_X = 50_000.0  # simulated s per wall s for step at dt = 1 s (<= 20 µs per step)


def _best_per_call_s(fn, number: int, repeat: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def run() -> list[str]:
    """Measure and return the report lines."""
    params = PlantConfig()
    state = plant.initial(params, seed=0, t0_s=100 * 86400.0)
    for _ in range(600):  # a warmed-up operating point, not the cold initial state
        state = plant.step(state, local_policy(plant.measure(state), params), 1.0)
    cmds = local_policy(plant.measure(state), params)
    n = 20_000

    step_s = _best_per_call_s(lambda: plant.step(state, cmds, 1.0), n)
    measure_s = _best_per_call_s(lambda: plant.measure(state), n)
    tank = np.asarray(state.tank_c)
    numpy_op_s = _best_per_call_s(lambda: tank * 1.0001, n)

    def bare() -> None:
        return None

    call_s = _best_per_call_s(bare, n)

    wall = time.perf_counter()
    fig, _ = simulate(params, 86400.0, dt_s=1.0, t0_s=100 * 86400.0)
    day_s = time.perf_counter() - wall

    speed_x = 1.0 / step_s
    return [
        "plant model (sim.plant), one core, default ~200 kW demo site, dt = 1 s",
        f"  step:                     {step_s * 1e6:8.2f} µs  = {speed_x:10,.0f} x real time"
        f"  (target {_TARGET_X:,.0f} x: {'met' if speed_x >= _TARGET_X else 'NOT met'})",
        f"  measure:                  {measure_s * 1e6:8.2f} µs",
        f"  baseline numpy op ({tank.size} el): {numpy_op_s * 1e6:8.2f} µs"
        f"  -> step = {step_s / numpy_op_s:5.1f} numpy ops",
        f"  baseline bare call:       {call_s * 1e6:8.3f} µs"
        f"  -> step = {step_s / call_s:5.0f} bare calls",
        f"  one simulated day, measure + local policy + step at dt = 1 s: {day_s:6.2f} s wall"
        f" ({86400.0 / day_s:,.0f} x real time)",
        f"  that day: reuse fraction {100 * fig.reuse_fraction:.1f} %,"
        f" balance error {fig.balance_error_pct:.2e} %",
    ]


if __name__ == "__main__":
    print("\n".join(run()))
