"""Scripted users: Locust's user model on asyncio, every call measured to the chunk.

A script defines `User` subclasses whose `@task` coroutines call the model
through `self.client` (`chat` / `completions`, streamed), think between tasks
(`wait_time`), and build token-exact text with `self.prompt` / `self.prefix`.

* `user` - `User`, `task`, `StopUser` and the wait-time helpers (the public API);
* `response` - what a call returns to the script (`Response`, `CallError`);
* `script` - loading a script file (or a bundled example) and checking it;
* `jobs` - the units the dispatcher hands out (a task to run, a user to start);
* `client` - `UserClient`, the per-user view of the worker's streaming client;
* `runtime` - runs users inside a worker process: tasks, waits, flow records;
* `replay` - runs replayed agent traces the same way: each trace a flow, each call when its parents ended.
"""
