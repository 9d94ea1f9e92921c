"""A tool-calling agent: call the model with tools, run the tools it asks for, call again with the results.

Each task is one agent run of at most `MAX_STEPS` model calls. The context
grows every step (the tool results go back into the conversation), which is
what makes agent traffic hard on a server: later steps have long prompts whose
front is the previous step's prompt, so a prefix cache should serve most of it.

Against a server that does not call tools (random weights, no tool parser),
each step's text stands in for the tool request and the loop goes on to
`MIN_STEPS`, so the context still grows as a real agent's would.
"""

import json

from servescope import User, between, task

MAX_STEPS = 6
MIN_STEPS = 3
TOOLS = [
    {"type": "function", "function": {
        "name": "search_docs", "description": "Search the documentation",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]


class ToolAgent(User):
    wait_time = between(0.5, 2.0)

    @task
    async def solve(self):
        messages = [
            {"role": "system", "content": self.prefix("agent-instructions", tokens=512)},
            {"role": "user", "content": self.prompt(tokens=128)},
        ]
        for step in range(MAX_STEPS):
            reply = await self.client.chat(messages=messages, tools=TOOLS, max_tokens=96,
                                           tool_choice="required" if step < MIN_STEPS else "auto")
            if not reply.ok:
                return  # the flow is recorded as an error; the user tries a new task after its think time
            messages.append(reply.message)
            if reply.tool_calls:
                for call in reply.tool_calls:
                    messages.append({"role": "tool", "tool_call_id": call.id or call.name,
                                     "content": self.run_tool(call.name, call.arguments)})
            elif step + 1 >= MIN_STEPS:
                return  # the model answered instead of calling a tool: done
            else:
                messages.append({"role": "user", "content": self.run_tool("search_docs", json.dumps({"query": reply.text[:80]}))})

    def run_tool(self, name: str, arguments: str) -> str:
        """The tool's output: text of a realistic length for what was asked (the tool itself is not the point)."""
        return f"{name} result: " + self.prompt(tokens=self.rng.randint(64, 256))
