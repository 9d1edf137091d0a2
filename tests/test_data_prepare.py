"""tools/prepare_data.py: common sources -> our JSONL, with stats; bad rows reported."""

import json
import os
import sys

import pytest

from tests.data_fixtures.helpers import HF_TOKENIZER, REPO, write_hf_dir, write_parquet

sys.path.insert(0, os.path.join(REPO, "tools"))
import prepare_data  # noqa: E402


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_convert_openr1_limo_numina_like_sources(tmp_path):
    openr1 = write_parquet(tmp_path / "openr1.parquet", [
        {"problem": "1+1?", "solution": "2", "messages": [{"role": "user", "content": "1+1?"},
                                                          {"role": "assistant", "content": "2"}]}])
    limo = write_hf_dir(tmp_path / "limo", [{"question": "2+2?", "solution": "4", "answer": "4"}])
    numina = write_parquet(tmp_path / "numina.parquet", [{"problem": "3+3?", "solution": "6", "source": "x"}])
    out = str(tmp_path / "out.jsonl")
    info = prepare_data.convert([openr1, limo, numina], out)
    assert info["written"] == 3 and info["skipped"] == 0
    assert [s["schema"] for s in info["sources"]] == ["messages", "prompt_response", "prompt_response"]
    assert [(s["prompt_key"], s["response_key"]) for s in info["sources"][1:]] == [("question", "solution"),
                                                                                   ("problem", "solution")]
    rows = read(out)
    assert rows[0] == {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    assert rows[1] == {"prompt": "2+2?", "response": "4"} and rows[2] == {"prompt": "3+3?", "response": "6"}
    info = prepare_data.convert([openr1], out, schema="prompt_response")
    assert read(out) == [{"prompt": "1+1?", "response": "2"}]


def test_bad_rows_error_or_counted_skip(tmp_path):
    src = write_parquet(tmp_path / "d.parquet", [{"problem": "q", "solution": "s"}, {"problem": "q", "solution": ""}])
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(prepare_data.DataError, match=r"d\.parquet:row 1: empty response"):
        prepare_data.convert([src], out)
    info = prepare_data.convert([src], out, skip_bad=True)
    assert info["written"] == 1 and info["skipped"] == 1 and "row 1" in info["first_errors"][0]
    nokeys = write_parquet(tmp_path / "k.parquet", [{"text": "x"}])
    with pytest.raises(prepare_data.DataError, match=r"columns present: \['text'\]"):
        prepare_data.convert([nokeys], out)


def test_cli_prints_length_stats(tmp_path, capsys):
    src = write_parquet(tmp_path / "d.parquet", [{"question": "word " * (5 * i + 1), "solution": "ok"}
                                                 for i in range(20)])
    out = str(tmp_path / "out.jsonl")
    assert prepare_data.main([src, "--out", out, "--tokenizer", HF_TOKENIZER, "--max-seq-length", "64"]) == 0
    stdout = capsys.readouterr().out
    info = json.loads(stdout.strip().splitlines()[-1])
    lengths = info["lengths"]
    assert lengths["samples"] == 20 and lengths["p50"] <= lengths["p90"] <= lengths["max"]
    assert 0 < lengths["would_truncate"] < 20
    assert "token lengths:" in stdout
    bad = write_parquet(tmp_path / "bad.parquet", [{"text": "x"}])
    assert prepare_data.main([bad, "--out", out]) == 1
    assert "bad.parquet:row 0" in capsys.readouterr().err
