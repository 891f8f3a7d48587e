"""The training child: build the trainer, callbacks that write the run folder, collation, preference objectives, several processes.

Modules: callbacks, child, collate, distributed, preference."""
