"""The fixed prompts a package's drafters are calibrated on (`pkg calibrate`), a few of each kind.

Kept apart from the measurement (and free of mlx) so that the CLI can name its defaults.
"""

from __future__ import annotations

# Short and varied, as served requests are; "chat" goes through the package's chat template.
CALIBRATION_PROMPTS: dict[str, tuple[str, ...]] = {
    "code": (
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "import json\n\n\ndef load_config(path):\n    with open(path) as f:\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    ),
    "prose": (
        "The old lighthouse stood at the edge of the cliff, and every night its keeper",
        "Photosynthesis is the process by which plants turn light into chemical energy. It",
        "In the spring of 1889 the town council met to decide what to do about the river, which",
    ),
    "chat": (
        "What is the capital of France, and what is it known for?",
        "Write a short poem about the sea.",
        "Explain in two sentences what a hash table is.",
    ),
}
DEFAULT_MAX_TOKENS = 48  # continuation tokens the target writes per prompt
