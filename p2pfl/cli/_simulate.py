"""`p2pfl simulate SCENARIO.toml`: run a scenario, show progress, then a results table."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

ENGINES = ("virtual", "processes")
PROCESSES_LEGEND = (
    "each setup's line: n<i> r<round> <metric> p<peers> per daemon: node i is in round <round>, "
    "its model scores <metric> (the task's primary metric) and it has <peers> connected peers; "
    "'n<i> -' is a node that is down"
)
SYNTHETIC_NOTE = (
    "[yellow]synthetic readings[/]: this traffic task trains on sensor speeds generated on the "
    "real sensor graph, not measured ones"
)


@click.command("simulate")
@click.argument("scenario", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="virtual",
    show_default=True,
    help="virtual: one process, virtual time; processes: real daemons in a private network.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Directory for results.json, CSV and plots [default: out/<scenario name>].",
)
def simulate(scenario: Path, engine: str, out: Path | None) -> None:
    """Run the setups of SCENARIO (a TOML file) and write results and plots."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from p2pfl.cli._errors import EXIT_USAGE, fail
    from p2pfl.sim.provenance import provenance, write_provenance
    from p2pfl.sim.results import (
        format_cell,
        format_rounds,
        summary_rows,
        table_columns,
        write_results,
    )
    from p2pfl.sim.scenario import ScenarioError, load_scenario

    try:
        spec = load_scenario(scenario)
    except ScenarioError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    module = importlib.import_module(f"p2pfl.sim.{engine}")
    record = provenance(["simulate", *sys.argv[2:]])  # before the run writes anything
    out_dir = out or Path("out") / spec.name
    try:  # before the run, not after it: a run's results must have somewhere to go
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"--out {out_dir}: {exc.strerror}; choose another folder", EXIT_USAGE) from None
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: do not squeeze the results table

    if engine == "processes":
        console.print(f"[dim]{PROCESSES_LEGEND}[/]")
    if spec.task.name.startswith("traffic-") and not spec.task.options.get("readings"):
        console.print(SYNTHETIC_NOTE)
    with Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    ) as progress:
        tasks = {s.name: progress.add_task(s.name, total=1.0, status="") for s in spec.setups}

        def report(setup: str, fraction: float, status: str) -> None:
            progress.update(tasks[setup], completed=min(fraction, 1.0), status=status)

        try:
            results = module.run(spec, progress=report)
        except ScenarioError as exc:  # a setup the engine refuses (file:line: key: problem)
            raise fail(str(exc), EXIT_USAGE) from None
        for task_id in tasks.values():
            progress.update(task_id, completed=1.0)

    paths = write_results(results, out_dir)
    paths.append(write_provenance(out_dir, record=record))
    rows = summary_rows(results)
    metric_cols = table_columns(results)
    shown = {"nodes", "rounds", "rounds_min", "rounds_max", "mb_sent", "virtual_s", "wall_s"}
    # The primary metric first, then the others of its family (mae_15 -> rmse_15, wmape_15).
    horizon = results.primary_metric.rpartition("_")[2] if "_" in results.primary_metric else ""
    metric_cols += sorted(
        {k for row in rows for k in row if k not in shown and k not in ("setup", "protocol")}
        - {"aggregation"},
        key=lambda k: (k != results.primary_metric, not k.endswith(horizon), k),
    )[:6]
    table = Table(title=f"{spec.name} ({results.engine} engine, seed {spec.seed})")
    for col in ["setup", "protocol", *metric_cols]:
        table.add_column(col, justify="left" if col in ("setup", "protocol") else "right")
    for row in rows:
        table.add_row(
            *(
                format_rounds(row) if col == "rounds" else format_cell(row.get(col, ""))
                for col in ["setup", "protocol", *metric_cols]
            )
        )
    console.print(table)
    console.print(f"wrote {', '.join(p.name for p in paths)} to {out_dir}")
