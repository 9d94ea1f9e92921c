"""Disaggregated prefill and decode: P prefill engine processes and D decode engine processes behind one front end.

A request is prefilled on a prefill engine (which keeps the prefix cache and
gives the client its first token), its prompt's KV blocks travel to a decode
engine through a `KVTransport` (`transport.py`), and decoding continues
there (`roles.py`: the two step loops; `pools.py`: the front end's client
that routes between them; `kv_blocks.py`: gathering and placing blocks;
`pd_metrics.py`: what the case is about, transfer time and bytes, queue depth,
decode time lost waiting for transfers, step time per pool).
"""
