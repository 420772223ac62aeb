"""Options and arguments that several commands share, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from layerline.packager.window_spec import WindowSpec


class QuantizeChoice(str, Enum):
    exact = "exact"
    q4 = "4bit"
    q8 = "8bit"
    f16 = "f16"
    bf16 = "bf16"
    f32 = "f32"


class WeightsChoice(str, Enum):
    auto = "auto"
    packed = "packed"
    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"


class WindowPolicyChoice(str, Enum):
    adaptive = "adaptive"
    fixed = "fixed"
    auto = "auto"


PackageArg = Annotated[Path, typer.Argument(help="Package folder.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress bars or load log lines.")]
QuantizeOpt = Annotated[QuantizeChoice, typer.Option(help="Weight format of the package.")]
PackageFormatOpt = Annotated[QuantizeChoice | None, typer.Option(
    "--quantize", help="Weight format of the package. exact (the default for a GGUF): keep its quantized "
                       "blocks where mlx holds them, re-quantize the rest; otherwise 4bit.", show_default=False)]
GroupSizeOpt = Annotated[int, typer.Option(help="Quantization group size.")]
WeightsOpt = Annotated[WeightsChoice, typer.Option(help="Weight format to compute with (auto: by device).")]
PrivateOpt = Annotated[bool, typer.Option(help="Create the Hub repo private.")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub branch to upload to.")]
ConfigFileOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML config (default ~/.config/layerline/config.toml).")]
NoDraftOpt = Annotated[bool, typer.Option("--no-draft", help="Serve without speculation.")]
AsJsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]

DEFAULT_WINDOW = WindowSpec()
WindowPolicyOpt = Annotated[WindowPolicyChoice, typer.Option(
    help="Draft window policy (auto: the window that maximises measured tokens per second).")]
InitialWindowOpt = Annotated[int, typer.Option(help="Tokens the first step drafts (every step, when fixed).")]
MinWindowOpt = Annotated[int, typer.Option(help="Smallest adaptive or auto window.")]
MaxWindowOpt = Annotated[int, typer.Option(help="Largest adaptive or auto window.")]
