import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.data import DataError, bundled_sets, load_file, load_set, set_name

EXPECTED = {
    "2wikimultihopqa_500": 500, "aime_90": 90, "bamboogle_125": 125, "gsm_hard_500": 500, "hotpotqa_500": 500,
    "math_500": 500, "musique_500": 500, "olymath_200": 200, "hotpotqa_1000": 1000, "math_1000": 998,
    "math_medium_1000": 998,
}


def test_bundled_sets_and_counts():
    sets = bundled_sets()
    assert set(sets) == set(EXPECTED)
    for name, n in EXPECTED.items():
        res = load_set(name)
        assert len(res.records) == n, name
        assert len(res.records) + len(res.skipped) == len(json.loads(sets[name].read_text())["examples"])


def test_ids_are_namespaced_strings_and_unique():
    a = load_set("math_1000").records
    b = load_set("math_medium_1000").records
    assert a[0].id == "math_1000/0" and b[0].id == "math_medium_1000/0"
    assert not {r.id for r in a} & {r.id for r in b}
    assert all(isinstance(r.id, str) for r in a)


def test_domains_and_gsm_hard_integer_golds():
    assert load_set("hotpotqa_500").records[0].domain == "qa"
    gsm = load_set("gsm_hard_500").records
    assert gsm[0].domain == "math" and gsm[0].answer == "13138980"


def test_bad_rows_counted_or_strict_error():
    res = load_set("math_medium_1000")
    assert len(res.skipped) == 2 and all("answer" in why for _, why in res.skipped)
    with pytest.raises(DataError, match=r"math_medium_1000_\d+\.json: row \d+: missing or empty answer"):
        load_set("math_medium_1000", strict=True)


def test_jsonl_parquet_and_hf_dir(tmp_path):
    rows = [{"id": 1, "question": "q1", "answer": "a"}, {"id": "x", "question": "q2", "answer": ["b", "c"]}]
    jl = tmp_path / "mine_2.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    res = load_file(jl)
    assert [r.id for r in res.records] == ["mine_2/1", "mine_2/x"]
    assert res.records[1].answer == ["b", "c"] and res.skipped[0][0] == 2
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        load_file(jl, strict=True)
    pqf = tmp_path / "pq_set.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "1", "question": "q", "answer": "a"}]), pqf)
    assert load_file(pqf).records[0].id == "pq_set/1"
    hf = tmp_path / "hfset"
    hf.mkdir()
    table = pa.Table.from_pylist([{"id": "7", "question": "q7", "golden_answers": ["g"]}])
    with pa.OSFile(str(hf / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert load_file(hf).records[0].answer == ["g"]


def test_set_name_strips_date():
    assert set_name("x/math_500_20250414.json") == "math_500"
    assert set_name("hotpotqa_1000_20250402.json") == "hotpotqa_1000"


def test_cli_data_list_and_show():
    out = subprocess.run([sys.executable, "-m", "raydistill", "data", "list"], capture_output=True, text=True,
                         check=True).stdout
    assert len([ln for ln in out.splitlines()[1:] if ln.strip()]) == 11
    assert "math_medium_1000" in out and "998" in out
    out = subprocess.run([sys.executable, "-m", "raydistill", "data", "show", "math_500", "--n", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert "[math_500/0]" in out and "[math_500/1]" in out and "[math_500/2]" not in out
    bad = subprocess.run([sys.executable, "-m", "raydistill", "data", "show", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown data set 'nope'" in bad.stderr
