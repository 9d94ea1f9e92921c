"""Fan-out / join: a planner call, three parallel worker calls on its sub-tasks, then one call that joins them.

The flow's duration is the planner, plus the slowest of the three workers,
plus the join: a slow worker call delays the whole flow, which the report's
flow view attributes to its step.
"""

import asyncio

from servescope import User, constant, task


class Planner(User):
    weight = 1
    wait_time = constant(1.0)

    @task
    async def plan_and_join(self):
        plan = await self.client.chat(messages=[{"role": "user", "content": self.prompt(tokens=256)}], max_tokens=64)
        if not plan.ok:
            return
        parts = await asyncio.gather(*(
            self.client.completions(prompt=plan.text + "\n\nSub-task:\n" + self.prompt(tokens=128), max_tokens=96)
            for _ in range(3)))
        joined = "\n\n".join(p.text for p in parts if p.ok)
        await self.client.chat(messages=[{"role": "user", "content": "Combine these results:\n" + joined}],
                               max_tokens=128)
