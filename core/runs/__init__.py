"""Runs on disk and their processes: the run folder contract, locks and process identity, start / stop / resume, resolving a run and its adapter.

Modules: access, folder, portable (everything that depends on the operating system), procs, resolve, runner."""
