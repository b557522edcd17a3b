"""The local tokenizer: round trips, special tokens, whole words, the ChatML template, and a
save/load through transformers (what the embedded server and SGLang read)."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from clawjax.tokenizer import (CHAT_TEMPLATE, IM_END, IM_START, MAX_VOCAB, PAD_TOKEN,
                               build_tokenizer, save_tokenizer)


def test_layout_and_round_trip():
    tok = build_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) <= MAX_VOCAB
    assert tok.convert_tokens_to_ids([PAD_TOKEN, IM_START, IM_END]) == [0, 1, 2]
    assert tok.eos_token == PAD_TOKEN and tok.pad_token_id == 0
    text = "Hello, world!\n\tx = 3 * (y + 2) ~ {ok}"
    ids = tok.encode(text)
    assert len(ids) == len(text)  # character level
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("é")) == "<unk>"  # unknown characters are <unk>, not dropped


def test_special_tokens_are_single_ids_and_skippable():
    tok = build_tokenizer()
    ids = tok.encode(f"{IM_START}user\nhi{IM_END}")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 2 + len("user\nhi")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_words_match_longest_first():
    tok = build_tokenizer(["hel", "hello", " world", "x"])
    ids = tok.encode("hello world!")
    assert tok.convert_ids_to_tokens(ids) == ["hello", " world", "!"]
    assert tok.decode(ids) == "hello world!"
    assert tok.encode("help") == tok.encode("hel") + tok.encode("p")


@pytest.mark.parametrize("vocab,match", [([""], r"vocab\[0\]"), ([3], r"vocab\[0\]"),
                                         ([IM_END], r"vocab\[0\]"),
                                         ([f"w{i}" for i in range(600)], "max_vocab")])
def test_bad_vocab_names_the_entry(vocab, match):
    with pytest.raises(ValueError, match=match):
        build_tokenizer(vocab)


def test_chat_template_is_chatml():
    tok = build_tokenizer()
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not tok.apply_chat_template(msgs, tokenize=False).endswith("assistant\n")


def test_save_and_load_with_transformers(tmp_path):
    tok = build_tokenizer(["hello"], eos_token=IM_END)
    files = save_tokenizer(tok, str(tmp_path))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    cfg = json.load(open(os.path.join(tmp_path, "tokenizer_config.json")))
    assert cfg["chat_template"] == CHAT_TEMPLATE
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nhello there<|im_end|>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.eos_token == IM_END and loaded.pad_token == PAD_TOKEN
    msgs = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
