"""Orchestration of several runs, one layer above a single run and the analyzers.

`capacity` (the rate search), `lab` (an experiment and its control) and
`log_import` (a production log written as a run directory) combine the
harness's single run with the analyzers' judgement; nothing below this layer
imports it.
"""
