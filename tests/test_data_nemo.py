"""NeMo SFT data as NeMo users write it: the data section of NeMo's
megatron_gpt_finetuning_config.yaml, with only the paths changed, in a run config; JSONL
{"input", "output"} records through prompt_template; NeMo keys with no meaning here accepted
with one warning; add_bos / add_eos / add_sep, truncation_field / truncation_method,
min_seq_length."""

import os

import pytest
import yaml

from psft_megatron.config import load_run_config
from psft_megatron.data import SFTDataset, TokenizerConfig, build_tokenizer
from psft_megatron.errors import UserError
from psft_megatron.training.data_plan import load_data_settings
from tests.data_fixtures.helpers import HF_TOKENIZER, REPO, SPM_MODEL, write_jsonl

# NeMo's data section (megatron_gpt_finetuning_config.yaml); only TRAIN / VALID (the paths) differ.
NEMO_DATA = """
  data:
    train_ds:
      file_names: [TRAIN]
      global_batch_size: ${model.global_batch_size}
      micro_batch_size: ${model.micro_batch_size}
      shuffle: True
      num_workers: 0
      memmap_workers: 2
      pin_memory: True
      max_seq_length: 2048
      min_seq_length: 1
      drop_last: True
      concat_sampling_probabilities: null
      label_key: 'output'
      add_eos: True
      add_sep: False
      add_bos: False
      truncation_field: "input"
      index_mapping_dir: null
      prompt_template: "{input} {output}"
      truncation_method: 'right'
      global_sample_mapping: False
    validation_ds:
      file_names: [VALID]
      names: null
      global_batch_size: ${model.global_batch_size}
      micro_batch_size: ${model.micro_batch_size}
      shuffle: False
      num_workers: 0
      memmap_workers: ${model.data.train_ds.memmap_workers}
      pin_memory: True
      max_seq_length: 2048
      min_seq_length: 1
      drop_last: False
      label_key: ${model.data.train_ds.label_key}
      add_eos: ${model.data.train_ds.add_eos}
      add_sep: ${model.data.train_ds.add_sep}
      add_bos: ${model.data.train_ds.add_bos}
      write_predictions_to_file: False
      output_file_path_prefix: null
      truncation_field: ${model.data.train_ds.truncation_field}
      index_mapping_dir: null
      prompt_template: ${model.data.train_ds.prompt_template}
      tokens_to_generate: 32
      truncation_method: 'right'
      global_sample_mapping: False
      metric:
        name: "loss"
        average: null
        num_classes: null
    test_ds:
      file_names: null
      names: null
      global_batch_size: ${model.global_batch_size}
      micro_batch_size: ${model.micro_batch_size}
      shuffle: False
      num_workers: 0
      memmap_workers: ${model.data.train_ds.memmap_workers}
      pin_memory: True
      max_seq_length: 2048
      min_seq_length: 1
      drop_last: False
      label_key: ${model.data.train_ds.label_key}
      add_eos: ${model.data.train_ds.add_eos}
      add_sep: ${model.data.train_ds.add_sep}
      add_bos: ${model.data.train_ds.add_bos}
      write_predictions_to_file: False
      output_file_path_prefix: null
      truncation_field: ${model.data.train_ds.truncation_field}
      index_mapping_dir: null
      prompt_template: ${model.data.train_ds.prompt_template}
      tokens_to_generate: 32
      truncation_method: 'right'
      global_sample_mapping: False
      metric:
        name: "loss"
        average: null
        num_classes: null
"""

RECORDS = [{"input": f"Add {a} and {b}.", "output": str(a + b)} for a in range(6) for b in range(5)]


@pytest.fixture(scope="module")
def nemo_run(tmp_path_factory):
    """configs/tiny_cpu.yaml with its data section replaced by NeMo's (paths changed)."""
    tmp = tmp_path_factory.mktemp("nemo")
    train = write_jsonl(tmp / "train.jsonl", RECORDS)
    valid = write_jsonl(tmp / "valid.jsonl", RECORDS[:11])
    with open(os.path.join(REPO, "configs", "tiny_cpu.yaml")) as f:
        base = yaml.safe_load(f)
    base["model"].pop("data")
    base["model"]["tokenizer"]["model"] = HF_TOKENIZER
    text = yaml.safe_dump(base, sort_keys=False).replace("\nmodel:\n", "\nmodel:\n" + NEMO_DATA.replace(
        "[TRAIN]", f"[{train}]").replace("[VALID]", f"[{valid}]").lstrip("\n") + "\n", 1)
    (tmp / "nemo_sft.yaml").write_text(text)
    return str(tmp), train, valid


def settings_of(nemo_run, *overrides, world=2):
    run_dir = os.path.join(nemo_run[0], "run")  # the run's token cache goes here, not into the repository
    cfg, _ = load_run_config(nemo_run[0], "nemo_sft", [f"exp_manager.explicit_log_dir={run_dir}"] + list(overrides))
    return load_data_settings(cfg, world)


def test_nemo_data_section_works_with_only_paths_changed(nemo_run):
    _, train, valid = nemo_run
    s = settings_of(nemo_run)
    assert s.train.uses_template and s.validation.uses_template and not s.validation.shuffle
    assert (s.val_global_batch_size, s.val_micro_batch_size) == (8, 4)
    # one warning naming every key that means nothing here
    (note,) = s.notes
    assert s.train.num_workers == 0 and "num_workers" not in note  # a key here: the tokenising processes
    for key in ("train_ds.memmap_workers", "train_ds.pin_memory",
                "train_ds.index_mapping_dir", "train_ds.global_sample_mapping", "validation_ds.names",
                "validation_ds.tokens_to_generate", "validation_ds.write_predictions_to_file", "validation_ds.metric",
                "validation_ds.output_file_path_prefix", "model.data.test_ds"):
        assert key in note, (key, note)
    tokenizer = build_tokenizer(s.tokenizer)
    ds = SFTDataset.build(s.train, tokenizer, s.tokenizer, tp=2, sequence_parallel=True)
    assert len(ds.spans) == 30 and ds.length_stats.kept == 30
    for k in (0, 17):
        ids, mask = ds.sample(k)
        rec = RECORDS[k]
        # "{input} {output}": the input is context, " " + output and the EOS are trained
        assert tokenizer.decode(ids[mask == 0]) == rec["input"]
        assert list(ids[mask == 1]) == tokenizer.encode(" " + rec["output"]) + [tokenizer.eos_id]
        assert tokenizer.decode(ids) == f"{rec['input']} {rec['output']}<|endoftext|>"
    val = SFTDataset.build(s.validation, tokenizer, s.tokenizer, tp=2, sequence_parallel=True)
    sampler = s.validation_sampler(val, 0, 2)
    assert sampler.evaluated == len(val) and sampler.not_evaluated == 0


def test_templates_escapes_truncation_and_min_length(nemo_run, tmp_path):
    long = {"input": "word " * 40 + "end", "output": "7"}
    f = write_jsonl(tmp_path / "long.jsonl", [long, RECORDS[3]])
    s = settings_of(nemo_run, f"model.data.train_ds.file_names=[{f}]", "model.data.train_ds.max_seq_length=28",
                    "model.data.train_ds.prompt_template='Q: {input}\\nA: {output}'", "model.global_batch_size=2",
                    "model.micro_batch_size=1")
    tokenizer = build_tokenizer(s.tokenizer)
    ds = SFTDataset.build(s.train, tokenizer, s.tokenizer)
    ids, mask = ds.sample(0)
    text = tokenizer.decode(ids)
    assert len(ids) == 28 and text.startswith("Q: word wor") and text.endswith("\nA: 7<|endoftext|>")
    assert "end\n" not in text  # truncation_method right: the end of the input field is cut
    assert list(ids[mask == 1]) == tokenizer.encode(" 7") + [tokenizer.eos_id]  # the label is never cut
    st = ds.length_stats
    assert (st.field_truncated, st.truncated, st.kept) == (1, 0, 2) and st.field_truncated_tokens > 0
    assert st.examples["field_truncated"] == f"{f}:line 1" and "1 shortened inside truncation_field" in st.summary()
    s = settings_of(nemo_run, f"model.data.train_ds.file_names=[{f}]", "model.data.train_ds.max_seq_length=16",
                    "model.data.train_ds.truncation_method=left", "model.global_batch_size=2", "model.micro_batch_size=1")
    ids = SFTDataset.build(s.train, tokenizer, s.tokenizer).sample(0)[0]
    assert len(ids) == 16 and tokenizer.decode(ids).endswith("word end 7<|endoftext|>")  # left: the start is cut
    s = settings_of(nemo_run, f"model.data.train_ds.file_names=[{f}]", "model.global_batch_size=2",
                    "model.micro_batch_size=1")
    short = int(SFTDataset.build(s.train, tokenizer, s.tokenizer).num_tokens()[1])
    s = settings_of(nemo_run, f"model.data.train_ds.file_names=[{f}]", f"model.data.train_ds.min_seq_length={short + 1}",
                    "model.global_batch_size=1", "model.micro_batch_size=1")
    ds = SFTDataset.build(s.train, tokenizer, s.tokenizer)
    assert ds.length_stats.dropped_too_short == 1 and len(ds.spans) == 1
    assert ds.length_stats.examples["dropped_too_short"] == f"{f}:line 2"


def test_bos_and_sep_need_the_tokens(nemo_run, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", RECORDS[:2])
    spm = TokenizerConfig(library="sentencepiece", model=SPM_MODEL)
    s = settings_of(nemo_run, f"model.data.train_ds.file_names=[{f}]", "model.data.train_ds.add_bos=true",
                    "model.global_batch_size=2", "model.micro_batch_size=1")
    ids, mask = SFTDataset.build(s.train, build_tokenizer(spm), spm).sample(0)
    assert ids[0] == build_tokenizer(spm).bos_id and mask[0] == 0
    for key in ("add_bos", "add_sep"):
        s = settings_of(nemo_run, f"model.data.train_ds.file_names=[{f}]", f"model.data.train_ds.{key}=true")
        with pytest.raises(UserError) as err:
            SFTDataset.build(s.train, build_tokenizer(s.tokenizer), s.tokenizer)
        assert err.value.line().startswith(f"config error: model.data.train_ds.{key}: the tokenizer has no")


@pytest.mark.parametrize("override,line", [
    ("model.data.train_ds.prompt_template='{output} {input}'",
     "config error: model.data.train_ds.prompt_template: {output} (label_key) must be at the end"),
    ("model.data.train_ds.truncation_field=context",
     "config error: model.data.train_ds.truncation_field: 'context' is not a placeholder of prompt_template"),
    ("model.data.train_ds.truncation_method=middle", "config error: model.data.train_ds.truncation_method: must be"),
    ("model.data.validation_ds.write_predictions_to_file=true",
     "config error: model.data.validation_ds.write_predictions_to_file: only false is supported"),
    ("model.data.validation_ds.metric.name=exact_string_match",
     "config error: model.data.validation_ds.metric.name: validation reports the loss"),
    ("model.data.train_ds.prompt_templat=x",
     "config error: unknown config key 'model.data.train_ds.prompt_templat'; did you mean 'prompt_template'?"),
])
def test_nemo_key_errors_are_one_line(nemo_run, override, line):
    with pytest.raises(UserError) as err:
        settings_of(nemo_run, override)
    assert err.value.line().startswith(line), err.value.line()


def test_record_errors_name_file_and_line(nemo_run, tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"question": "q", "output": "a"}, {"input": "q", "output": 3}])
    s = settings_of(nemo_run, f"model.data.train_ds.file_names=[{f}]")
    with pytest.raises(UserError) as err:
        SFTDataset.build(s.train, build_tokenizer(s.tokenizer), s.tokenizer)
    assert err.value.line() == (f"data error: {f}:line 2: missing key 'input' (no 'input'); "
                                "keys present: ['output', 'question']")
    f = write_jsonl(tmp_path / "bad2.jsonl", [{"input": "q", "output": 3}])
    s = settings_of(nemo_run, f"model.data.train_ds.file_names=[{f}]")
    with pytest.raises(UserError) as err:
        SFTDataset.build(s.train, build_tokenizer(s.tokenizer), s.tokenizer)
    assert err.value.line() == f"data error: {f}:line 1: 'output' must be a string, got int"
