"""scripts/results_table.py: a new measurement replaces its machine's rows in scripts/README.md, and no other."""

import re
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import results_table  # noqa: E402

ZEN3 = "AMD EPYC (family 25 model 1), 2 cores"
ZEN5 = "AMD EPYC (family 26 model 2), 2 cores"
PAGE = """# Results

Text before.

<!-- results: speed -->
| machine | date | commit | run | images/s |
| --- | --- | --- | --- | --- |
| {zen3} | 2026-12-01 | aaaaaaa | 112 px | 30.0 |
| {zen5} | 2026-12-02 | bbbbbbb | 112 px | 50.0 |
| {zen3} | 2026-12-01 | aaaaaaa | 224 px | 7.0 |
<!-- /results: speed -->

Text after.
""".format(zen3=ZEN3, zen5=ZEN5)


def row(machine, run, rate, date="2026-12-09", commit="ccccccc"):
    return {"machine": machine, "date": date, "commit": commit, "run": run, "images/s": rate}


def table_rows(text, name="speed"):
    body = text.split(f"<!-- results: {name} -->\n")[1].split(f"<!-- /results: {name} -->")[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in body.strip().splitlines()[2:]]


def test_measuring_one_machine_again_replaces_its_row_and_keeps_the_others():
    text = results_table.replace_rows(PAGE, "speed", [row(ZEN5, "112 px", "55.5")], key=("machine", "run"))
    assert table_rows(text) == [
        [ZEN3, "2026-12-01", "aaaaaaa", "112 px", "30.0"],
        [ZEN5, "2026-12-09", "ccccccc", "112 px", "55.5"],  # in the old row's place
        [ZEN3, "2026-12-01", "aaaaaaa", "224 px", "7.0"],
    ]
    assert text.split("<!-- results")[0] == PAGE.split("<!-- results")[0]
    assert text.split("-->\n")[-1] == PAGE.split("-->\n")[-1]  # text around the table untouched


def test_a_new_machine_or_run_is_added_and_a_run_of_several_rows_is_replaced_whole():
    text = results_table.replace_rows(PAGE, "speed", [row(ZEN5, "224 px", "12.0")], key=("machine", "run"))
    assert [r[0] for r in table_rows(text)] == [ZEN3, ZEN5, ZEN3, ZEN5]
    # A table whose run spans several rows (benchmark_model --layers: one per part): all of them go.
    layered = results_table.replace_rows(PAGE, "speed", [row(ZEN3, "all", "1"), row(ZEN3, "all", "2")],
                                         key=("machine",))
    assert table_rows(layered) == [[ZEN3, "2026-12-09", "ccccccc", "all", "1"],
                                   [ZEN3, "2026-12-09", "ccccccc", "all", "2"],
                                   [ZEN5, "2026-12-02", "bbbbbbb", "112 px", "50.0"]]


def test_a_machine_is_its_cpu_family_model_and_cores_not_its_marketing_name():
    # Under a hypervisor lscpu may say "AMD EPYC" on one day and "AMD EPYC 9B45" on another.
    renamed = "AMD EPYC 7B13 (family 25 model 1), 2 cores"
    text = results_table.replace_rows(PAGE, "speed", [row(renamed, "112 px", "31.0")], key=("machine", "run"))
    assert [r[:1] + r[3:] for r in table_rows(text)] == [
        [renamed, "112 px", "31.0"], [ZEN5, "112 px", "50.0"], [ZEN3, "224 px", "7.0"]]
    more_cores = "AMD EPYC (family 25 model 1), 4 cores"
    text = results_table.replace_rows(PAGE, "speed", [row(more_cores, "112 px", "60.0")], key=("machine", "run"))
    assert len(table_rows(text)) == 4


def test_a_table_written_for_the_first_time_gets_its_header():
    empty = "<!-- results: new -->\n<!-- /results: new -->\n"
    text = results_table.replace_rows(empty, "new", [row(ZEN3, "112 px", "1.0")], key=("machine", "run"))
    assert text.splitlines()[1] == "| machine | date | commit | run | images/s |"
    assert table_rows(text, "new") == [[ZEN3, "2026-12-09", "ccccccc", "112 px", "1.0"]]


def test_other_columns_or_a_missing_table_are_errors_naming_the_table():
    with pytest.raises(ValueError, match="table speed: its header"):
        results_table.replace_rows(PAGE, "speed", [{**row(ZEN3, "112 px", "1"), "extra": "x"}], key=("machine", "run"))
    with pytest.raises(ValueError, match="no table 'other'"):
        results_table.replace_rows(PAGE, "other", [row(ZEN3, "112 px", "1")], key=("machine", "run"))


def test_write_rows_rewrites_the_file(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(PAGE)
    results_table.write_rows(page, "speed", [row(ZEN3, "224 px", "8.0")])
    assert table_rows(page.read_text())[2] == [ZEN3, "2026-12-09", "ccccccc", "224 px", "8.0"]
    assert not list(tmp_path.glob("*.tmp"))


def test_this_machine_is_named_by_family_model_and_cores():
    assert re.fullmatch(r".+ \(family \d+ model \d+\), \d+ cores", results_table.cpu()) or "family" not in open(
        "/proc/cpuinfo").read()
    stamp = results_table.stamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", stamp["date"]) and re.fullmatch(r"[0-9a-f]{7,}\+?|unknown", stamp["commit"])


# Tables that live in the README, next to what they measure, written there with `--markdown README.md`.
IN_THE_README = {"benchmark_serve", "benchmark_serve_ready"}


def test_every_table_a_script_writes_is_in_scripts_readme():
    readme = (SCRIPTS / "README.md").read_text()
    user_readme = (SCRIPTS.parent / "README.md").read_text()
    written = set()
    for script in SCRIPTS.glob("*.py"):
        source = script.read_text()
        written |= set(re.findall(r'write_rows\([^,]+, "([^"]+)"', source))
        written |= {f"benchmark_model {device}" for device in ("cpu", "gpu") if 'f"benchmark_model {args.device}"' in source}
    assert {"benchmark_model cpu", "benchmark_model layers", "benchmark_e2e", "benchmark_loop", "benchmark_data",
            "benchmark_data datasets", "benchmark_data step", "benchmark_export", "compare_face_detectors", "gpu_check"} <= written
    assert IN_THE_README <= written
    for name in written:
        where = user_readme if name in IN_THE_README else readme
        assert f"<!-- results: {name} -->" in where and f"<!-- /results: {name} -->" in where, name
