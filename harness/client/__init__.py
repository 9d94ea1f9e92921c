"""The measuring client: streams OpenAI-compatible completions and timestamps every chunk.

    client = StreamingClient(ClientConfig(base_url="http://127.0.0.1:8000", model="m",
                                          clock_origin=time.perf_counter()))
    await client.prewarm(64)
    await client.execute(spec, record)   # fills record; never raises for a failed request
    await client.aclose()
"""

from servescope.harness.client.client import StreamingClient
from servescope.harness.client.config import TRANSPORTS, ClientConfig

__all__ = ["ClientConfig", "StreamingClient", "TRANSPORTS"]
