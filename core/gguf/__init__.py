"""GGUF / Ollama: export through llama.cpp's tools, its runtime in a child process, the parity check, the Modelfile and chat with an export.

Modules: chat, child, export, gotemplate, modelfile, parity, read, tools."""
