"""`layerline config show` prints the resolved speculation settings with their sources."""

from __future__ import annotations

import json
import subprocess
import sys


def test_config_show_names_each_source(smollm2_package, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[defaults.speculative]\nmax_window = 12\n\n'
                      '[models."HuggingFaceTB/SmolLM2-135M-Instruct".speculative]\n'
                      'draft_model = "./draft"\ninitial_window = 3\n')
    base = [sys.executable, "-m", "layerline", "config", "show", "--package", str(smollm2_package),
            "--config", str(config)]
    done = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    assert resolved["enabled"] is True and resolved["draft_model"] == "./draft"
    assert resolved["sources"]["max_window"] == f"{config} [defaults.speculative]"
    text = subprocess.run(base, capture_output=True, text=True, timeout=120).stdout
    assert './draft' in text and '[models."HuggingFaceTB/SmolLM2-135M-Instruct".speculative]' in text
    off = subprocess.run([*base, "--no-draft", "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(off.stdout)["reason"] == "speculation disabled by --no-draft"
