"""The complexity tables of `summarize.py` (docs/MODELS.md): one model beside the paper, its
stages, and the paper models side by side; as Markdown or as rich tables for a terminal."""

from __future__ import annotations

from gunn_exp.analysis.complexity import StageRow, Summary
from gunn_exp.analysis.paper import PAPER, paper_reference
from gunn_exp.analysis.tables import markdown_table, rich_table
from gunn_exp.analysis.units import MB

METHOD = (
    "MACs: forward hooks on Conv2d/Linear with the reference GUNN implementation (BN, ReLU, "
    "pooling, additions not counted); FLOPs = 2 x MACs. Saved for backward: storages autograd "
    "holds after a training forward, measured with saved_tensors_hooks for the impl shown."
)

# (title, header, rows, leading text columns) of one table.
_Table = tuple[str, list[str], list[list[str]], int]


def giga(n: int) -> str:
    """Multiply-adds or FLOPs in G, three significant digits, the way papers quote them."""
    return f"{n / 1e9:.3g}G"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MB:,.1f} MiB"


def shape(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s))


def summary_lines(s: Summary) -> list[list[str]]:
    """[quantity, ours, paper] rows of a model's summary (memory rows only where measured)."""
    ref = paper_reference(s.model)
    rows = [
        ["Parameters", f"{s.params:,}", ref.params if ref else ""],
        [
            "Multiply-adds per image",
            f"{s.macs:,} ({giga(s.macs)})",
            (ref.macs or "not given") if ref else "",
        ],
        ["FLOPs per image (2 x MACs)", f"{s.flops:,} ({giga(s.flops)})", ""],
    ]
    if s.saved_bytes is not None:
        rows.append(["Saved for backward per image", f"{mib(s.saved_bytes)} (impl {s.impl})", ""])
    if s.peak_saved_bytes is not None:
        rows.append(["Peak saved, forward + backward", mib(s.peak_saved_bytes), ""])
    if s.cuda_peak_bytes is not None:
        rows.append(["CUDA peak, training step", mib(s.cuda_peak_bytes), ""])
    return rows


STAGE_HEADER = ["stage", "params", "MACs per image", "output (CxHxW)"]


def stage_cells(r: StageRow) -> list[str]:
    return [r.name, f"{r.params:,}", f"{r.macs:,}", shape(r.output_shape)]


def _summary_tables(s: Summary) -> list[_Table]:
    title = f"{s.model} on {s.data} (input {shape(s.input_shape)})"
    return [
        (title, ["", "ours", "paper"], summary_lines(s), 1),
        ("Per stage", STAGE_HEADER, [stage_cells(r) for r in s.stages], 1),
    ]


def markdown_summary(s: Summary) -> str:
    """A model's summary and stage table as Markdown."""
    title = f"**{s.model}** on {s.data} (input {shape(s.input_shape)})"
    tables = [markdown_table(header, rows, text) for _, header, rows, text in _summary_tables(s)]
    return "\n\n".join([title, *tables]) + "\n"


ZOO_HEADER = [
    "model",
    "data (input)",
    "params",
    "paper params",
    "MACs",
    "paper MACs",
    "FLOPs",
    "saved for backward / image",
]


def zoo_cells(s: Summary) -> list[str]:
    ref = PAPER[s.model]
    name = s.model + (" (reconstructed)" if ref.reconstructed else "")
    return [
        name,
        f"{s.data} ({shape(s.input_shape)})",
        f"{s.params:,}",
        ref.params,
        giga(s.macs),
        ref.macs or "not given",
        giga(s.flops),
        f"{mib(s.saved_bytes)} ({s.impl})",
    ]


def markdown_zoo(summaries: list[Summary]) -> str:
    """The paper models side by side as one Markdown table."""
    return markdown_table(ZOO_HEADER, [zoo_cells(s) for s in summaries], text_columns=2) + "\n"


def _print_rich(tables: list[_Table]) -> None:
    from rich.console import Console

    console = Console()
    for table in tables:
        console.print(rich_table(*table))
    console.print(METHOD, style="dim")


def print_summary(s: Summary, fmt: str = "rich") -> None:
    """Print a model's summary and stage table as rich tables or Markdown."""
    if fmt == "markdown":
        print(markdown_summary(s) + f"\n{METHOD}")
    else:
        _print_rich(_summary_tables(s))


def print_zoo(summaries: list[Summary], fmt: str = "rich") -> None:
    """Print the paper models side by side as a rich table or Markdown."""
    if fmt == "markdown":
        print(markdown_zoo(summaries) + f"\n{METHOD}")
    else:
        _print_rich([("Paper models", ZOO_HEADER, [zoo_cells(s) for s in summaries], 2)])
