"""`servescope serve` (and `python -m servescope.reference_engine`): parse engine flags, build the engine, serve.

Thin on purpose: options become an `EngineConfig`; `LLMEngine.build` makes the
engine here (thread mode) or `engine_process.start_engine_process` makes it in
a child process (process mode), and `server.serve` serves it; all are tested
without the CLI.
"""

from __future__ import annotations

import os
import signal

import click

from servescope.reference_engine.config import PRESETS, SpecConfig, parse_size
from servescope.reference_engine.errors import ConfigError


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu", param_hint="--device")
    return device


# --max-num-batched-tokens and --max-num-seqs when not given, as vLLM's API server picks them: a GPU of
# 70 GiB or more (H100, H200) takes 8192 tokens a step and 1024 requests, a smaller GPU 2048 and 256.
# The CPU takes 2048 and 64: the tiny model on a few cores gains nothing from a wider batch.
BIG_GPU_BYTES = 70 << 30
BIG_GPU_DEFAULTS = (8192, 1024)
GPU_DEFAULTS = (2048, 256)
CPU_DEFAULTS = (2048, 64)


def device_defaults(device: str) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) for a resolved --device when the flags are not given."""
    if not device.startswith("cuda"):
        return CPU_DEFAULTS
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return BIG_GPU_DEFAULTS if total >= BIG_GPU_BYTES else GPU_DEFAULTS


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(PRESETS), default=None,
              help="Model shape with seeded random weights (default: tiny, unless --model is given).")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local Hugging Face checkpoint dir (config.json, *.safetensors, tokenizer files).")
@click.option("--served-model-name", default=None, help="Name in /v1/models and responses (default: preset or dir name).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Tokenizer dir (default: the bundled one for presets, the checkpoint's for --model).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda (auto: cuda if available).")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--attention-backend", default="auto", show_default=True, type=click.Choice(["auto", "torch", "triton"]),
              help="auto: triton on CUDA when kernels.backend imports, else torch.")
@click.option("--kv-cache-memory", default=None, help="KV pool size, e.g. 256MB (default: 256MB on CPU, 80% of free GPU memory).")
@click.option("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (overrides --kv-cache-memory).")
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=None,
              help="Token budget per step (default by device: 8192 on a GPU of 70 GiB or more, else 2048).")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=None,
              help="Most requests in the running batch (default by device: 1024 on a GPU of 70 GiB or more, "
                   "256 on a smaller GPU, 64 on the CPU).")
@click.option("--max-model-len", type=int, default=None, help="Context limit (default: the model's).")
@click.option("--chunked-prefill/--no-chunked-prefill", default=True, show_default=True,
              help="--no-chunked-prefill prefills each prompt whole in its own step, stalling decodes (convoy).")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True)
@click.option("--max-waiting", type=int, default=None, help="Bound on queued requests; beyond it: HTTP 429.")
@click.option("--spec", default=None,
              help="Speculative decoding, e.g. ngram:k=4,n=3 (default: off): up to k drafts per step, each request "
                   "drafting only as far as its acceptance so far and the measured step times say pays; "
                   "ngram:k=4,adaptive=0 drafts k every step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and of sampling.")
@click.option("--api-key", default=None, envvar="SERVESCOPE_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--threads", type=int, default=None,
              help="torch CPU threads (default: 1 for the tiny preset, else all cores up to 4).")
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True,
              help="CUDA: replay decode steps through CUDA graphs captured at bucketed batch sizes "
                   "(Triton backend only).")
@click.option("--enforce-eager", is_flag=True, default=False, help="Same as --no-cuda-graph.")
@click.option("--cuda-graph-max-len", type=int, default=8192, show_default=True,
              help="Longest context a graphed decode step serves; longer ones run eagerly.")
@click.option("--piecewise-graph-max-tokens", type=click.IntRange(min=0), default=2048, show_default=True,
              help="CUDA: steps with prefill chunks of up to this many tokens replay piecewise CUDA graphs "
                   "(all but attention, per layer, at bucketed token counts); 0 runs them eagerly.")
@click.option("--async-scheduling/--no-async-scheduling", default=None,
              help="Schedule step N+1 while step N runs, sampling on the device "
                   "(default: on for CUDA, off on the CPU; with --spec a step that drafts runs alone).")
@click.option("--tensor-parallel-size", "-tp", "tensor_parallel_size", type=click.IntRange(min=1), default=1,
              show_default=True,
              help="Split the model over N ranks, one process each (NCCL on CUDA, rank r on cuda:r; gloo on the "
                   "CPU): attention heads, MLP and vocabulary sharded, KV heads split or replicated.")
@click.option("--debug-pause", default=None, metavar="EVERY:FOR",
              help="Fault injection: the engine stands still FOR every EVERY of serving, e.g. 4s:1.5s.")
@click.option("--engine-process/--no-engine-process", default=True, show_default=True,
              help="Run the engine (model, scheduler, detokenizer, metrics) in its own process, apart from the "
                   "HTTP server's event loop, as vLLM's EngineCore does. On CUDA the host-bound step loop must not "
                   "share a GIL with the SSE writing; on the CPU process mode measured as fast or faster "
                   "(benchmarks/engine_cpu.py). --no-engine-process runs it in a thread of the server.")
@click.option("--disaggregate", default=None, metavar="P:D",
              help="Disaggregated prefill and decode: P prefill engine processes (prefix cache, first token) and D "
                   "decode engine processes behind this server; each request's KV blocks move from one to the "
                   "other (see --kv-transport), e.g. 1:1.")
@click.option("--kv-transport", default="auto", show_default=True, type=click.Choice(["auto", "shm", "socket"]),
              help="With --disaggregate, how KV blocks travel: shm (shared memory; auto) or socket (through the "
                   "server's sockets).")
def serve(preset: str | None, model_path: str | None, served_model_name: str | None, tokenizer_dir: str | None,
          host: str, port: int, device: str, dtype: str, attention_backend: str, kv_cache_memory: str | None,
          num_kv_blocks: int | None, block_size: int, max_num_batched_tokens: int | None, max_num_seqs: int | None,
          max_model_len: int | None, chunked_prefill: bool, enable_prefix_caching: bool, max_waiting: int | None,
          spec: str | None, seed: int, api_key: str | None, threads: int | None, cuda_graph: bool,
          enforce_eager: bool, cuda_graph_max_len: int, piecewise_graph_max_tokens: int,
          async_scheduling: bool | None, debug_pause: str | None, tensor_parallel_size: int,
          engine_process: bool, disaggregate: str | None, kv_transport: str) -> None:
    """Start the bundled reference engine (OpenAI-compatible server)."""
    for module in ("torch", "aiohttp"):  # the engine extra: the model, and the HTTP server
        try:
            __import__(module)
        except ImportError:
            raise click.ClickException(
                f"the reference engine needs {module}, which is not installed; install the engine extra with "
                "`pip install torch==2.13.0 -e '.[engine]'` (the harness alone runs without it)") from None
    import torch

    from servescope.reference_engine.config import EngineConfig
    from servescope.reference_engine.engine_process import EngineLaunch, start_engine_process
    from servescope.reference_engine.server import serve as run_server

    if preset and model_path:
        raise click.UsageError("give --preset or --model, not both")
    # The tiny model's ops are too small to split; one thread also stays fast when the load
    # generator shares the cores (a spinning thread pool under contention is many times slower).
    tiny = model_path is None and (preset or "tiny") == "tiny"
    torch_threads = threads or (1 if tiny else max(1, min(4, os.cpu_count() or 1)))
    name = served_model_name or (os.path.basename(os.path.normpath(model_path)) if model_path else preset or "tiny")
    try:
        resolved_device = _resolve_device(device)
        default_tokens, default_seqs = device_defaults(resolved_device)
        config = EngineConfig(
            block_size=block_size, num_kv_blocks=num_kv_blocks,
            kv_cache_memory=parse_size(kv_cache_memory) if kv_cache_memory else None,
            max_num_batched_tokens=max_num_batched_tokens or default_tokens, max_num_seqs=max_num_seqs or default_seqs,
            chunked_prefill=chunked_prefill, max_waiting=max_waiting, max_model_len=max_model_len,
            spec=SpecConfig.parse(spec), enable_prefix_caching=enable_prefix_caching,
            device=resolved_device, dtype=dtype, attention_backend=attention_backend, seed=seed,
            served_model_name=name, cuda_graph=cuda_graph and not enforce_eager,
            cuda_graph_max_len=cuda_graph_max_len, piecewise_graph_max_tokens=piecewise_graph_max_tokens,
            async_scheduling=async_scheduling, debug_pause=EngineConfig.parse_debug_pause(debug_pause),
            tensor_parallel_size=tensor_parallel_size)
        if engine_process:  # built in the child; a ConfigError there comes back as one
            launch = EngineLaunch(config, preset or "tiny", model_path, tokenizer_dir, name, torch_threads)
            # A SIGTERM while the engine loads must still reap the child: make it an interrupt until then.
            previous = signal.signal(signal.SIGTERM, _interrupt)
            try:
                if disaggregate:
                    from servescope.reference_engine.disagg.pools import DisaggConfig, start_disaggregated

                    engine = start_disaggregated(launch, DisaggConfig.parse(disaggregate, kv_transport))
                else:
                    engine = start_engine_process(launch)
            finally:
                signal.signal(signal.SIGTERM, previous)
        else:
            if disaggregate:
                raise click.UsageError("--disaggregate runs engine processes; drop --no-engine-process")
            from servescope.reference_engine.engine import LLMEngine

            torch.set_num_threads(torch_threads)
            engine = LLMEngine.build(config, preset_name=preset or "tiny", model_path=model_path,
                                     tokenizer_dir=tokenizer_dir)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    run_server(engine, host, port, name, api_key)
