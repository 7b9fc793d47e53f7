"""The OpenAI-compatible HTTP door: routes (`http.py`) over the engine binding (`binding.py`)."""
