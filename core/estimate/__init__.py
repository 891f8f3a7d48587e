"""Before a run: VRAM per component with its constants, bounds on settings, the ETA and GPU specs.

Modules: constants, eta, gpu_specs, limits, vram."""
