"""Runs on disk and their processes: the run folder contract, locks and process identity, start / stop / resume, resolving a run and its adapter.

Modules: access, folder, procs, resolve, runner."""
