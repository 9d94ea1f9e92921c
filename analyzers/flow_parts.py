"""Where a flow's time went: each step's share of the wall time, and the time no call covered.

A flow's duration is split into parts that add up to it exactly. Walking its
calls in send order, each call is credited with the wall time it adds to the
time already covered by earlier calls (its end past the latest end so far, or
its whole span when it starts after a gap); what no call covers is
`BETWEEN_CALLS`: the script's own time, tools, think time inside the task.
Parallel calls thus share their common time: the first one sent gets it, and
each other one only the time it keeps the flow waiting beyond that. That is
what a user waits on, so the slowest of a fan-out is the one credited for
the extra wait.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BETWEEN_CALLS = "between calls"


def step_label(step: float) -> str:
    return f"step {int(step)}" if np.isfinite(step) else "step ?"


def call_exposure(calls: pd.DataFrame, flows: pd.DataFrame) -> pd.Series:
    """Per call (the index of `calls`): seconds it adds to its flow's covered time (0 for a call of an unknown flow)."""
    by_id = flows.set_index("flow_id")
    start = calls["flow_id"].map(by_id["start_at"]).to_numpy(dtype=np.float64)
    stop = calls["flow_id"].map(by_id["end_at"]).to_numpy(dtype=np.float64)
    sent = calls["sent_at"].to_numpy(dtype=np.float64)
    end = np.minimum(calls["end_at"].to_numpy(dtype=np.float64), stop)
    frame = pd.DataFrame({"flow": calls["flow_id"].to_numpy(dtype=object), "sent": sent, "end": end, "start": start},
                         index=calls.index).sort_values(["flow", "sent", "end"], kind="stable")
    latest = frame.groupby("flow", sort=False)["end"].cummax()
    before = latest.groupby(frame["flow"], sort=False).shift(1)
    covered_to = np.fmax(before.to_numpy(dtype=np.float64), frame["start"].to_numpy(dtype=np.float64))
    begin = np.fmax(frame["sent"].to_numpy(dtype=np.float64), covered_to)
    exposed = np.clip(frame["end"].to_numpy(dtype=np.float64) - begin, 0.0, None)
    return pd.Series(np.nan_to_num(exposed), index=frame.index).reindex(calls.index)


def flow_parts(flows: pd.DataFrame, calls: pd.DataFrame) -> pd.DataFrame:
    """One row per flow (index flow_id): a column per step (its credited seconds) and BETWEEN_CALLS.

    The columns of a row add up to the flow's `duration_s`.
    """
    ids = flows["flow_id"].to_numpy(dtype=object)
    mine = calls[calls["flow_id"].isin(ids)]
    exposed = call_exposure(mine, flows)
    steps = mine["step"].to_numpy(dtype=np.float64)
    table = pd.DataFrame({"flow_id": mine["flow_id"].to_numpy(dtype=object),
                          "step": steps, "exposed": exposed.to_numpy(dtype=np.float64)})
    wide = table.pivot_table(index="flow_id", columns="step", values="exposed", aggfunc="sum", fill_value=0.0)
    wide = wide.reindex(index=ids, fill_value=0.0).fillna(0.0)
    wide.columns = [step_label(s) for s in wide.columns]
    duration = flows["duration_s"].to_numpy(dtype=np.float64)
    wide[BETWEEN_CALLS] = np.clip(duration - wide.sum(axis=1).to_numpy(), 0.0, None)
    return wide
