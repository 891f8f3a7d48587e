"""The thin Gradio layer: builds the pages, calls core, formats what it returns. No training logic here."""
