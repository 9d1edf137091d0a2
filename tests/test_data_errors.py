"""Bad input: every error names the file, the line/row and the key/problem; nothing silent."""

import os

import pytest

from psft_megatron.data import DataConfig, DataError, SFTDataset, TokenizerConfig, build_tokenizer
from psft_megatron.data.config import ConfigError
from psft_megatron.data.dataset import load_or_tokenize
from psft_megatron.data.readers import iter_records
from tests.data_fixtures.helpers import HF_TOKENIZER, write_hf_dir, write_jsonl, write_parquet

GOOD = {"prompt": "What is 1 + 2?", "response": "3"}


@pytest.fixture(scope="module")
def tok():
    cfg = TokenizerConfig(library="huggingface", model=HF_TOKENIZER)
    return build_tokenizer(cfg), cfg


def build(tok, files, **kw):
    tokenizer, tok_cfg = tok
    cfg = DataConfig(file_names=[str(f) for f in files], **kw)
    cfg.validate()
    return SFTDataset(load_or_tokenize(cfg, tokenizer, tok_cfg)[0], cfg, pad_id=tokenizer.pad_id)


def error_of(tok, files, **kw) -> str:
    with pytest.raises(DataError) as exc:
        build(tok, files, **kw)
    return str(exc.value)


def test_malformed_json_names_file_and_line(tok, tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"prompt": "x", "response": '])
    msg = error_of(tok, [f])
    assert f"{f}:line 3" in msg and "malformed JSON" in msg


def test_non_utf8_names_line(tok, tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    msg = error_of(tok, [f])
    assert f"{f}:line 2" in msg and "UTF-8" in msg


def test_missing_key_lists_keys_present(tok, tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [GOOD, {"question": "q", "response": "r"}])
    msg = error_of(tok, [f], schema="prompt_response")
    assert f"{f}:line 2" in msg and "missing key 'prompt'" in msg and "['question', 'response']" in msg


def test_missing_nested_key(tok, tmp_path):
    f = write_jsonl(tmp_path / "n.jsonl", [{"extra_info": {"question": "q", "solution": "s"}}])
    msg = error_of(tok, [f], prompt_key="extra_info.question", response_key="extra_info.answer")
    assert f"{f}:line 1" in msg and "'extra_info.answer'" in msg and "['question', 'solution']" in msg


def test_wrong_type(tok, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "response": 42}])
    msg = error_of(tok, [f])
    assert f"{f}:line 1" in msg and "'response' must be a string, got int" in msg
    f = write_jsonl(tmp_path / "t2.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": ["b"]}]}])
    msg = error_of(tok, [f])
    assert "messages[1].content must be a string, got list" in msg
    f = write_jsonl(tmp_path / "t3.jsonl", [{"messages": [{"role": "robot", "content": "a"}]}])
    assert "messages[0].role must be one of" in error_of(tok, [f])
    f = write_jsonl(tmp_path / "t4.jsonl", ['["not", "an", "object"]'])
    assert "expected a JSON object" in error_of(tok, [f])


def test_empty_response(tok, tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [GOOD, {"prompt": "q", "response": "  "}])
    msg = error_of(tok, [f])
    assert f"{f}:line 2" in msg and "empty response" in msg
    f = write_jsonl(tmp_path / "e2.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert "no assistant message" in error_of(tok, [f])


def test_parquet_and_hf_dir_errors_name_the_row(tok, tmp_path):
    rows = [GOOD, GOOD, {"prompt": "q", "response": ""}]
    f = write_parquet(tmp_path / "d.parquet", rows)
    msg = error_of(tok, [f])
    assert f"{f}:row 2" in msg and "empty response" in msg
    d = write_hf_dir(tmp_path / "hf", [{"problem": "q", "solution": "s"}] * 2)
    msg = error_of(tok, [d])
    assert f"{d}:row 0" in msg and "missing key 'prompt'" in msg and "['problem', 'solution']" in msg


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(iter_records(str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        list(iter_records(str(tmp_path / "x.csv")))


def test_too_long_error_policy(tok, tmp_path):
    f = write_jsonl(tmp_path / "l.jsonl", [GOOD, {"prompt": "word " * 100, "response": "ok"}])
    msg = error_of(tok, [f], max_seq_length=64, length_policy="error")
    assert f"{f}:line 2" in msg and "max_seq_length=64" in msg


def test_drop_and_truncate_are_counted(tok, tmp_path):
    long = {"prompt": "word " * 100, "response": "ok"}
    f = write_jsonl(tmp_path / "l.jsonl", [GOOD, long, GOOD])
    ds = build(tok, [f], max_seq_length=64, length_policy="drop", packing=False)
    st = ds.length_stats
    assert (st.seen, st.kept, st.dropped_too_long) == (3, 2, 1) and st.examples["dropped_too_long"] == f"{f}:line 2"
    ds = build(tok, [f], max_seq_length=64, length_policy="truncate", truncation_side="left", packing=False)
    assert ds.length_stats.truncated == 1 and ds.length_stats.truncated_tokens > 0
    assert max(ds.num_tokens()) == 64
    assert "1 truncated" in ds.length_stats.summary()


def test_all_zero_loss_mask_after_truncation(tok, tmp_path):
    # right truncation cuts the whole response away: error or counted skip, by policy
    f = write_jsonl(tmp_path / "z.jsonl", [GOOD, {"prompt": "word " * 100, "response": "ok"}])
    msg = error_of(tok, [f], max_seq_length=64, truncation_side="right", empty_loss_policy="error")
    assert f"{f}:line 2" in msg and "loss mask is all zero after truncation" in msg
    ds = build(tok, [f], max_seq_length=64, truncation_side="right", empty_loss_policy="skip", packing=False)
    assert ds.length_stats.skipped_empty_loss == 1 and ds.length_stats.kept == 1
    assert ds.length_stats.examples["skipped_empty_loss"] == f"{f}:line 2"


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.data\.train_ds\.max_seq_length"):
        DataConfig.from_dict({"file_names": ["a.jsonl"], "max_seq_length": 0})
    with pytest.raises(ConfigError, match=r"model\.data\.train_ds\.length_policy"):
        DataConfig.from_dict({"file_names": ["a.jsonl"], "length_policy": "cut"})
    with pytest.raises(ConfigError, match=r"model\.data\.train_ds\.bogus"):
        DataConfig.from_dict({"file_names": ["a.jsonl"], "bogus": 1})
    with pytest.raises(ConfigError, match=r"model\.data\.validation_ds\.file_names"):
        DataConfig.from_dict({}, prefix="model.data.validation_ds")
    with pytest.raises(ConfigError, match=r"model\.tokenizer\.library"):
        TokenizerConfig.from_dict({"library": "tiktoken", "model": "x"})
    with pytest.raises(ConfigError, match=r"model\.tokenizer\.model"):
        TokenizerConfig.from_dict({"library": "huggingface"})
    with pytest.raises(ConfigError, match="not a directory"):
        build_tokenizer(TokenizerConfig(library="huggingface", model="/nonexistent/dir"))
    assert TokenizerConfig.from_dict({"library": "huggingface", "type": HF_TOKENIZER}).path == HF_TOKENIZER


def test_pyarrow_is_optional_with_an_install_hint():
    from psft_megatron.optional import MissingOptionalDependency, require

    with pytest.raises(MissingOptionalDependency, match=r"pip install -e '\.\[data\]'"):
        require("pyarrow.no_such_module")


def test_template_that_rewrites_earlier_turns_is_reported(tmp_path):
    from psft_megatron.data import SampleFormatter
    from psft_megatron.data.conversation import to_conversation

    tokenizer = build_tokenizer(TokenizerConfig(library="huggingface", model=HF_TOKENIZER))
    # a template that drops earlier assistant turns (like templates that strip old <think> blocks)
    tokenizer.hf.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    fmt = SampleFormatter(tokenizer, TokenizerConfig(library="huggingface", model=HF_TOKENIZER))
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    loc = __import__("psft_megatron.data.errors", fromlist=["Location"]).Location("x.jsonl", line=4)
    with pytest.raises(DataError, match=r"x\.jsonl:line 4: the chat template is not prefix-stable"):
        fmt(to_conversation({"messages": msgs}, loc, "messages", "p", "r", "messages"), loc)


# ---------------------------------------------------------------------------------------------
# Every bad data input is ONE line (a UserError: "data error: FILE:line N: ..." or
# "config error: KEY: ..."), raised by the trainer's data set-up, before any training step.

@pytest.fixture(autouse=True)
def _run_dir_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run dir (runs/..., its token cache) of data_setup


def data_setup(train_ds: dict, **model):
    """What Trainer.setup does with the data before the first step, in-process (world of one)."""
    from psft_megatron.config import build_run_config
    from psft_megatron.training.data_plan import load_data_settings

    raw = {"model": {"global_batch_size": 2, "micro_batch_size": 1, **model,
                     "tokenizer": {"library": "huggingface", "model": HF_TOKENIZER},
                     "data": {"train_ds": {"packing": False, **train_ds}}}}
    settings = load_data_settings(build_run_config(raw), world_size=1)
    tokenizer = build_tokenizer(settings.tokenizer)
    ds = SFTDataset.build(settings.train, tokenizer, settings.tokenizer)
    return settings.train_sampler(ds, ds.micro_batch_size(1), 0, 1)


def one_line(train_ds: dict, **model) -> str:
    from psft_megatron.errors import UserError

    with pytest.raises(UserError) as exc:
        data_setup(train_ds, **model)
    line = exc.value.line()
    assert "\n" not in line, line
    return line


def test_bad_data_files_are_one_line_naming_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "empty.jsonl", [])
    assert one_line({"file_names": [f]}).startswith(f"data error: {f}: no records: the file is empty")
    f = write_jsonl(tmp_path / "key.jsonl", [GOOD, {"question": "q", "response": "r"}])
    assert one_line({"file_names": [f]}).startswith(f"data error: {f}:line 2: missing key 'prompt'")
    f = write_jsonl(tmp_path / "type.jsonl", [{"prompt": "q", "response": 42}])
    assert one_line({"file_names": [f]}) == f"data error: {f}:line 1: 'response' must be a string, got int"
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    assert one_line({"file_names": [str(f)]}).startswith(f"data error: {f}:line 2: not valid UTF-8")
    f = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "robot", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]}])
    assert one_line({"file_names": [f]}).startswith(f"data error: {f}:line 1: messages[0].role must be one of")
    f = write_jsonl(tmp_path / "noasst.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert one_line({"file_names": [f]}).startswith(f"data error: {f}:line 1: 'messages' has no assistant message")
    f = write_jsonl(tmp_path / "array.json", ['[{"prompt": "a", "response": "b"}'])
    assert "one object per line" in one_line({"file_names": [f]})
    f = write_jsonl(tmp_path / "long.jsonl", [GOOD, {"prompt": "word " * 100, "response": "ok"}])
    line = one_line({"file_names": [f], "max_seq_length": 64, "length_policy": "error"})
    assert line.startswith(f"data error: {f}:line 2: sample has ") and "max_seq_length=64" in line


def test_bad_parquet_and_directories_are_one_line(tmp_path):
    f = write_parquet(tmp_path / "cols.parquet", [{"question": "q", "answer": "a"}] * 2)
    assert one_line({"file_names": [f]}).startswith(
        f"data error: {f}:row 0: missing key 'prompt' (no 'prompt'); keys present: ['answer', 'question']")
    d = tmp_path / "notadataset"
    d.mkdir()
    (d / "x.txt").write_text("hi")
    assert one_line({"file_names": [str(d)]}).startswith(
        f"data error: {d}: directory is not a Hugging Face save_to_disk dataset")
    d = write_hf_dir(tmp_path / "broken", [GOOD])
    with open(os.path.join(d, "state.json"), "w") as fh:
        fh.write("{not json")
    assert one_line({"file_names": [d]}).startswith(f"data error: {d}/state.json: state.json is not valid JSON")


def test_damaged_cache_is_one_line(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    cache = tmp_path / "cache"
    data_setup({"file_names": [f], "cache_dir": str(cache)})
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]  # the cache (file_hashes.json beside it)
    (entry / "offsets.npy").write_bytes(b"garbage")
    line = one_line({"file_names": [f], "cache_dir": str(cache)})
    assert line.startswith(f"data error: {entry}: unreadable token cache") and "delete the directory" in line


@pytest.mark.parametrize("train_ds,model,expected", [
    ({"max_seq_length": 0}, {}, "config error: model.data.train_ds.max_seq_length: must be an int > 1, got 0"),
    ({"max_seq_len": 64}, {}, "config error: unknown config key 'model.data.train_ds.max_seq_len'; did you mean "
                              "'max_seq_length'?"),
    ({"packing": "yes"}, {}, "config error: model.data.train_ds.packing must be true or false, got 'yes'"),
    ({"file_names": ["???"]}, {}, "config error: model.data.train_ds.file_names[0]: '???' is a placeholder"),
    ({"min_seq_length": 5000}, {}, "config error: model.data.train_ds.min_seq_length: must be an int in [1, "
                                   "max_seq_length=4096], got 5000"),
    ({"min_seq_length": 500}, {}, "data error: model.data.train_ds: no sample of"),
    ({"global_batch_size": 16}, {}, "config error: model.data.train_ds.global_batch_size: 16 differs from "
                                    "model.global_batch_size=2"),
    ({"truncation_field": "input"}, {}, "config error: model.data.train_ds.truncation_field: applies to "
                                        "prompt_template data only"),
    ({}, {"global_batch_size": 8}, "data error: model.data.train_ds: 3 samples (after the length policy) are fewer "
                                   "than one global batch (model.global_batch_size=8)"),
])
def test_data_config_errors_are_one_line_naming_the_key(tmp_path, train_ds, model, expected):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    line = one_line({"file_names": [f], **train_ds}, **model)
    assert line.startswith(expected), line
    if "min_seq_length" in train_ds and "no sample" in expected:
        assert line.endswith("3 dropped as shorter than min_seq_length); lower model.data.train_ds.min_seq_length")
