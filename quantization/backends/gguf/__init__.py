"""GGUF: the backend (`backend.py`) and the converter that writes .gguf files (`convert.py`)."""
