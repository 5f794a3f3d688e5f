"""``creditflow sql --format table|csv|json`` on a tiny real workspace (one published artifact, a real catalog)."""

import csv
import io
import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from creditflow.flows.cli import app
from creditflow.storage.workspace import Workspace

# NaN and both infinities, alone and inside a list: JSON has no literal for any of them.
QUERY = (
    "SELECT x, x / 2 AS half, 'nan'::DOUBLE AS n, 'inf'::DOUBLE AS i, ['-inf'::DOUBLE, 1.5] AS l "
    "FROM curate_pairs ORDER BY x"
)


@pytest.fixture
def workspace(tmp_path):
    ws = Workspace.resolve(tmp_path / "ws")
    writer = ws.store.writer("curate", "a" * 24)
    writer.write_table("pairs", pa.table({"x": [1, 2, 3]}))
    ws.store.publish(writer, stage="curate", fingerprint="a" * 24, inputs={}, config={}, code_version="v")
    return ws


def sql(ws: Workspace, *args: str):
    result = CliRunner().invoke(app, ["sql", QUERY, "-w", str(ws.root), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_sql_json_is_strict_json_with_null_for_nan_and_infinity(workspace):
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    rows = json.loads(sql(workspace, "--format", "json"), parse_constant=refuse)
    assert rows == [{"x": x, "half": x / 2, "n": None, "i": None, "l": [None, 1.5]} for x in (1, 2, 3)]


def test_sql_csv_prints_a_header_and_every_row(workspace):
    rows = list(csv.reader(io.StringIO(sql(workspace, "--format", "csv", "--limit", "1"))))
    assert rows[0] == ["x", "half", "n", "i", "l"]
    assert [r[:2] for r in rows[1:]] == [["1", "0.5"], ["2", "1.0"], ["3", "1.5"]]


def test_sql_table_respects_limit_and_refuses_unknown_formats(workspace):
    out = sql(workspace, "--limit", "2")
    body = [line.split("│")[1:3] for line in out.splitlines() if line.startswith("│")]
    assert [[cell.strip() for cell in cells] for cells in body] == [["1", "0.5"], ["2", "1.0"]]
    assert "half" in out and "... 1 more rows (--format csv or json prints all)" in out
    bad = CliRunner().invoke(app, ["sql", QUERY, "-w", str(workspace.root), "--format", "xml"])
    assert bad.exit_code != 0 and "--format must be table, csv or json, got 'xml'" in bad.output
