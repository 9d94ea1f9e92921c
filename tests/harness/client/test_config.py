"""ClientConfig validation and secrecy."""

from __future__ import annotations

import pytest

from servescope.harness.client import ClientConfig
from servescope.harness.client.endpoint import Endpoint


def test_api_key_is_not_in_repr() -> None:
    cfg = ClientConfig("http://127.0.0.1:1", "m", 0.0, api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(cfg)
    assert "sk-secret-123" not in str(cfg)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"base_url": "127.0.0.1:8000"}, "http(s) URL"),
        ({"model": ""}, "model is empty"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"pool_size": 0}, "pool_size"),
        ({"transport": "curl"}, "transport 'curl' is unknown"),
    ],
)
def test_bad_settings_say_what_is_wrong(kwargs: dict, needle: str) -> None:
    base = {"base_url": "http://127.0.0.1:8000", "model": "m", "clock_origin": 0.0}
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        ClientConfig(**{**base, **kwargs})


def test_endpoint_drops_a_trailing_v1_and_keeps_a_prefix() -> None:
    assert Endpoint.from_url("http://h:8000/v1/").path("/v1/completions") == "/v1/completions"
    ep = Endpoint.from_url("https://api.example.com/openai")
    assert (ep.port, ep.host_header, ep.path("/v1/models")) == (443, "api.example.com", "/openai/v1/models")
