"""Token ids, loss masks, end-of-turn, collate shift, padding multiples, packing metadata."""

import numpy as np
import pytest
import torch

from psft_megatron.data import (DataConfig, SampleFormatter, SFTDataset, TokenizerConfig, build_tokenizer,
                                collate_packed, collate_unpacked, pack, packed_row_length, per_sample_sum,
                                required_multiple)
from psft_megatron.data.dataset import load_or_tokenize
from psft_megatron.data.errors import Location
from psft_megatron.data.conversation import to_conversation
from tests.data_fixtures.helpers import HF_TOKENIZER, SPM_MODEL, TINY_SFT, write_jsonl

LOC = Location("mem.jsonl", line=1)


@pytest.fixture(scope="module")
def hf():
    cfg = TokenizerConfig(library="huggingface", model=HF_TOKENIZER)
    tok = build_tokenizer(cfg)
    return tok, SampleFormatter(tok, cfg)


def conv(record, schema="auto", **keys):
    return to_conversation(record, LOC, schema, keys.get("prompt_key", "prompt"),
                           keys.get("response_key", "response"), keys.get("messages_key", "messages"))


def trained_text(tok, ids, mask):
    return [tok.hf.decode(ids[s:e].tolist()) for s, e in _runs(mask)]


def _runs(mask):
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_chat_template_masks_and_trains_im_end_not_pad(hf):
    tok, fmt = hf
    im_end = tok.token_to_id("<|im_end|>")
    # the fixture is Qwen-base-like: EOS == pad == <|endoftext|>, the template ends turns with <|im_end|>
    assert tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>") != im_end
    assert fmt.eot_id == im_end
    ids, mask = fmt(conv({"prompt": "What is 2 + 3?", "response": "2 + 3 = 5."}), LOC)
    assert ids.dtype == np.int32 and mask.dtype == np.uint8 and ids.shape == mask.shape
    full = tok.render_chat([{"role": "user", "content": "What is 2 + 3?"},
                            {"role": "assistant", "content": "2 + 3 = 5."}])
    assert tok.hf.decode(ids.tolist()) == full  # the pieces re-assemble the rendered template
    assert trained_text(tok, ids, mask) == ["2 + 3 = 5.<|im_end|>"]
    last = np.nonzero(mask)[0][-1]
    assert ids[last] == im_end and mask[last] == 1  # the terminator is trained...
    assert not mask[last + 1:].any()  # ...the "\n" after it is not
    assert tok.pad_id not in ids[mask.astype(bool)]  # the pad token is never a target
    # after collate, padding positions carry no loss
    batch = collate_unpacked([(ids, mask), (ids[:20], mask[:20])], tok.pad_id)
    assert batch["loss_mask"][1, 19:].sum() == 0 and (batch["seq_ids"][1, 19:] == -1).all()


def test_multi_turn_messages_train_every_assistant_turn(hf):
    tok, fmt = hf
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Copy: red sun"},
            {"role": "assistant", "content": "red sun"}, {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "1 + 1 = 2."}]
    ids, mask = fmt(conv({"messages": msgs}), LOC)
    assert tok.hf.decode(ids.tolist()) == tok.render_chat(msgs)
    assert trained_text(tok, ids, mask) == ["red sun<|im_end|>", "1 + 1 = 2.<|im_end|>"]


def test_prompt_as_message_list_and_dotted_keys(hf):
    tok, fmt = hf
    rec = {"extra_info": {"question": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                          "answer": "A"}}
    ids, mask = fmt(conv(rec, "prompt_response", prompt_key="extra_info.question",
                         response_key="extra_info.answer"), LOC)
    assert trained_text(tok, ids, mask) == ["A<|im_end|>"]
    assert tok.hf.decode(ids.tolist()).startswith("<|im_start|>system\nS<|im_end|>")


def test_plain_prompt_template_trains_eos(hf):
    tok, _ = hf
    cfg = TokenizerConfig(library="huggingface", model=HF_TOKENIZER, chat_template=False,
                          prompt_template="Question: {prompt}\nAnswer: ")
    fmt = SampleFormatter(tok, cfg)
    assert fmt.eot_id == tok.eos_id
    ids, mask = fmt(conv({"prompt": "What is 2 + 3?", "response": "5"}), LOC)
    assert tok.hf.decode(ids[mask == 0].tolist()) == "Question: What is 2 + 3?\nAnswer: "
    assert ids[-1] == tok.eos_id and mask[-1] == 1


def test_sentencepiece_plain_template_with_bos():
    cfg = TokenizerConfig.from_dict({"library": "sentencepiece", "model": SPM_MODEL})
    tok = build_tokenizer(cfg)
    fmt = SampleFormatter(tok, cfg)
    assert not fmt.use_chat and fmt.eot_id == tok.eos_id
    ids, mask = fmt(conv({"prompt": "Copy: red sun", "response": "red sun"}), LOC)
    assert ids[0] == tok.bos_id and mask[0] == 0
    assert ids[-1] == tok.eos_id and mask[-1] == 1
    assert tok.decode(ids[mask == 1][:-1].tolist()) == "red sun"
    with pytest.raises(Exception, match="chat_template=true needs library=huggingface"):
        TokenizerConfig.from_dict({"library": "sentencepiece", "model": SPM_MODEL, "chat_template": True})


def test_required_multiple():
    assert required_multiple(1, 1, False) == 1
    assert required_multiple(4, 1, False) == 1  # no SP: TP does not split the sequence
    assert required_multiple(4, 1, True) == 4
    assert required_multiple(2, 2, False) == 4
    assert required_multiple(4, 2, True) == 4
    assert required_multiple(3, 2, True) == 12


def test_collate_unpacked_shift_and_padding():
    ids = np.array([10, 11, 12, 13, 14], np.int32)
    mask = np.array([0, 0, 1, 1, 1], np.uint8)
    b = collate_unpacked([(ids, mask), (ids[:3], mask[:3])], pad_id=0, multiple=4)
    assert b["tokens"].dtype == torch.int64 and b["loss_mask"].dtype == torch.float32
    assert b["tokens"].shape == (2, 4)
    assert b["tokens"][0].tolist() == [10, 11, 12, 13] and b["labels"][0].tolist() == [11, 12, 13, 14]
    assert b["loss_mask"][0].tolist() == [0, 1, 1, 1]
    assert b["labels"][1].tolist() == [11, 12, 0, 0] and b["loss_mask"][1].tolist() == [0, 1, 0, 0]
    assert b["seq_ids"].tolist() == [[0, 0, 0, 0], [1, 1, -1, -1]]
    assert collate_unpacked([(ids, mask)], 0, multiple=4, pad_to=9)["tokens"].shape == (1, 12)


def test_collate_packed_thd_metadata():
    a = (np.arange(1, 6, dtype=np.int32), np.array([0, 0, 1, 1, 1], np.uint8))  # 4 positions
    b = (np.arange(20, 23, dtype=np.int32), np.array([0, 1, 1], np.uint8))  # 2 positions
    out = collate_packed([a, b], row_length=8, pad_id=0)
    p = out["packed_seq_params"]
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert out["cu_seqlens"].tolist() == [0, 4, 6, 8] and p.cu_seqlens_q_padded is None
    assert p.max_seqlen_q == p.max_seqlen_kv == 4  # the longest segment, never the row length
    assert out["tokens"].tolist() == [[1, 2, 3, 4, 20, 21, 0, 0]]
    assert out["labels"].tolist() == [[2, 3, 4, 5, 21, 22, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1]]
    assert out["seq_ids"].tolist() == [[0, 0, 0, 0, 1, 1, -1, -1]]
    # CP=2: every sample padded to a multiple of 4; real lengths in cu_seqlens_q
    out = collate_packed([a, b], row_length=12, pad_id=0, segment_multiple=4)
    p = out["packed_seq_params"]
    assert p.cu_seqlens_q_padded.tolist() == [0, 4, 8, 12] and p.cu_seqlens_q.tolist() == [0, 4, 6, 10]
    assert out["seq_ids"].tolist() == [[0, 0, 0, 0, 1, 1, -1, -1, -1, -1, -1, -1]]
    # per-sample sums (for seq-mean aggregation)
    sums = per_sample_sum(out["loss_mask"][0], out["seq_ids"][0], 2)
    assert sums.tolist() == [3.0, 2.0]


def test_pack_is_deterministic_and_fits():
    rng = np.random.default_rng(0)
    n = rng.integers(2, 100, size=500)
    rows = pack(n, 127)
    assert rows == pack(n, 127)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(int(n[i]) - 1 for i in r) <= 127 for r in rows)
    assert packed_row_length(128, 8) == 128 and packed_row_length(100, 1) == 99
    with pytest.raises(ValueError, match="packed row length"):
        pack([200], 127)


def test_dataset_packed_items_cover_all_samples(hf, tmp_path):
    tok, _ = hf
    tok_cfg = TokenizerConfig(library="huggingface", model=HF_TOKENIZER)
    cfg = DataConfig(file_names=[f"{TINY_SFT}/train.jsonl"], max_seq_length=200, packing=True)
    ds = SFTDataset(load_or_tokenize(cfg, tok, tok_cfg)[0], cfg, pad_id=tok.pad_id, multiple=4)
    assert ds.row_length == 200 and ds.micro_batch_size(8) == 1
    seen = []
    for r in range(len(ds)):
        b = ds.collate([r])
        assert b["tokens"].shape == (1, 200)
        ks = ds.item_samples(r)
        assert b["sample_index"].tolist() == ks
        for j, k in enumerate(ks):  # tokens of seq_id j are sample k shifted
            ids, mask = ds.sample(k)
            sel = b["seq_ids"][0] == j
            assert b["tokens"][0][sel].tolist() == ids[:-1].tolist()
            assert b["loss_mask"][0][sel].tolist() == mask[1:].tolist()
        seen += ks
    assert sorted(seen) == list(range(len(ds.spans)))
    rep = ds.report()
    assert rep["packing"]["rows"] == len(ds) and 0 < rep["packing"]["efficiency"] <= 1


def test_parquet_and_hf_dir_sources(hf, tmp_path):
    from tests.data_fixtures.helpers import write_hf_dir, write_parquet

    tok, _ = hf
    tok_cfg = TokenizerConfig(library="huggingface", model=HF_TOKENIZER)
    recs = [{"question": f"What is {i} + 1?", "solution": f"{i + 1}"} for i in range(5)]
    files = [write_parquet(tmp_path / "a.parquet", recs), write_hf_dir(tmp_path / "hf", recs),
             write_jsonl(tmp_path / "c.jsonl", recs)]
    cfg = DataConfig(file_names=files, prompt_key="question", response_key="solution", packing=False)
    store, _ = load_or_tokenize(cfg, tok, tok_cfg)
    assert len(store) == 15
    for i in range(5):  # same text -> same tokens whatever the container
        assert store.get(i)[0].tolist() == store.get(5 + i)[0].tolist() == store.get(10 + i)[0].tolist()
    assert str(store.location(6)) == f"{files[1]}:row 1" and str(store.location(12)) == f"{files[2]}:line 3"


def test_datasetdict_split(hf, tmp_path):
    import json
    import os

    from tests.data_fixtures.helpers import write_hf_dir

    tok, _ = hf
    tok_cfg = TokenizerConfig(library="huggingface", model=HF_TOKENIZER)
    root = tmp_path / "dd"
    write_hf_dir(root / "train", [{"prompt": "a", "response": "b"}] * 3)
    write_hf_dir(root / "test", [{"prompt": "a", "response": "b"}])
    with open(os.path.join(root, "dataset_dict.json"), "w") as f:
        json.dump({"splits": ["train", "test"]}, f)
    for split, n in (("train", 3), ("test", 1)):
        store, _ = load_or_tokenize(DataConfig(file_names=[str(root)], split=split), tok, tok_cfg)
        assert len(store) == n and str(store.location(0)) == f"{root / split}:row 0"
    from psft_megatron.data import DataError

    with pytest.raises(DataError, match=r"no split 'valid'; splits present: \['train', 'test'\]"):
        load_or_tokenize(DataConfig(file_names=[str(root)], split="valid"), tok, tok_cfg)


def test_conversation_opening_with_assistant_trains_only_its_content(hf):
    tok, fmt = hf
    msgs = [{"role": "assistant", "content": "hello there"}, {"role": "user", "content": "Copy: sun"}]
    ids, mask = fmt(conv({"messages": msgs}), LOC)
    assert trained_text(tok, ids, mask) == ["hello there<|im_end|>"]
    assert tok.hf.decode(ids.tolist()) == tok.render_chat(msgs)
