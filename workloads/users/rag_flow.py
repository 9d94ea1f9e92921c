"""Retrieval-augmented generation: retrieve (a think-time stand-in), then answer over shared documents.

Every question is asked over one of a few document sets; a set's text is the
same for every user (`self.prefix`), so a server with a prefix cache computes
its KV once. The report's prefix-cache view shows whether it did.
"""

import asyncio

from servescope import User, between, task

DOCUMENT_SETS = ["handbook", "api-reference", "release-notes"]


class Researcher(User):
    wait_time = between(1.0, 3.0)

    @task(3)
    async def answer(self):
        await asyncio.sleep(self.rng.uniform(0.02, 0.08))  # the retriever: vector search + reranking
        docs = self.prefix(self.rng.choice(DOCUMENT_SETS), tokens=1024)
        await self.client.chat(messages=[
            {"role": "system", "content": "Answer from these documents only.\n\n" + docs},
            {"role": "user", "content": self.prompt(tokens=48)},
        ], max_tokens=128)

    @task(1)
    async def summarize(self):
        docs = self.prefix(self.rng.choice(DOCUMENT_SETS), tokens=1024)
        await self.client.completions(prompt=docs + "\n\nSummary:", max_tokens=192)
