"""The run directory: the contract between the load generator, the analyzers and users.

* `schema` - file names, `FORMAT_VERSION`, the request and flow records and the
  Arrow schemas of `requests.parquet`, `flows.parquet` and
  `server_metrics.parquet` (one definition each);
* `jsonio` - the one atomic, NaN-safe JSON writer;
* `writer` - `RunDirWriter`, which writes a run directory while the run goes;
* `reader` - `load_run(dir) -> RunData`, which reads one back as pandas frames.

Both sides import this package; it imports neither.
"""
