"""A multi-turn chat: every turn carries the whole conversation so far, with reading and typing time between.

Each task is one conversation of 2-6 turns; the user thinks 1-4 s between
turns (inside the flow, so it shows as flow time not covered by calls) and
1-3 s between conversations.
"""

import asyncio

from servescope import User, between, task


class Chatter(User):
    wait_time = between(1.0, 3.0)

    @task
    async def conversation(self):
        messages = [{"role": "system", "content": self.prefix("assistant-persona", tokens=64)}]
        for _ in range(self.rng.randint(2, 6)):
            messages.append({"role": "user", "content": self.prompt(tokens=self.rng.randint(16, 96))})
            reply = await self.client.chat(messages=messages, max_tokens=self.rng.randint(32, 160))
            if not reply.ok:
                return
            messages.append(reply.message)
            await asyncio.sleep(self.rng.uniform(1.0, 4.0))  # reading the answer, typing the next question
