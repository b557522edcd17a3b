"""A small local tokenizer for tiny models: characters plus optional whole words, no downloads.

`build_tokenizer()` returns a `transformers.PreTrainedTokenizerFast` built with the `tokenizers`
library. Ids are laid out as:

    0..3   special tokens  <|endoftext|> (pad and eos), <|im_start|>, <|im_end|>, <unk>
    4..    single characters: "\\n", "\\t" and printable ASCII (space .. "~")
    then   the caller's extra words (multi-character entries of `vocab`), longest match first

so a tiny model with `vocab_size = len(tokenizer)` (<= 512 by default) can use it. Any text made
of known characters round-trips exactly: `decode(encode(s)) == s`. Unknown characters map to
`<unk>`. The chat template is Qwen-style ChatML:

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... [<|im_start|>assistant\\n]

`tokenizer.save_pretrained(dir)` writes `tokenizer.json` and `tokenizer_config.json` (with the
chat template), which is what the embedded server and SGLang load from a model directory.
"""

from __future__ import annotations

import re
import string

import tokenizers
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, UNK_TOKEN)
MAX_VOCAB = 512

# Printable ASCII minus the vertical whitespace we do not want as separate tokens.
BASE_CHARS = ["\n", "\t"] + [c for c in string.printable if c not in "\n\t\r\x0b\x0c"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_tokenizer(vocab: list[str] | None = None, *, eos_token: str = PAD_TOKEN,
                    max_vocab: int = MAX_VOCAB,
                    model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """Builds the character(+word)-level tokenizer described in the module docstring.

    Args:
      vocab: extra entries. Single characters not already present are added as characters;
        multi-character entries become whole-word tokens matched greedily (longest first) before
        falling back to characters. Duplicates are ignored; order decides ids.
      eos_token: the end-of-sequence token (`<|endoftext|>` by default; `<|im_end|>` also ends
        chat turns at the server).
      max_vocab: the largest vocabulary allowed (ids must fit a tiny model's embedding).
    Raises:
      ValueError naming `vocab` when an entry is empty, not a string, a special token, or the
      vocabulary would exceed `max_vocab`.
    """
    if eos_token not in SPECIAL_TOKENS:
        raise ValueError(f"eos_token = {eos_token!r}, expected one of {SPECIAL_TOKENS}")
    pieces: dict[str, int] = {}
    for tok in list(SPECIAL_TOKENS) + BASE_CHARS:
        pieces.setdefault(tok, len(pieces))
    words: list[str] = []
    for i, entry in enumerate(vocab or []):
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"vocab[{i}] = {entry!r}, expected a non-empty string")
        if entry in SPECIAL_TOKENS:
            raise ValueError(f"vocab[{i}] = {entry!r}, expected a non-special entry "
                             f"(special tokens are always present)")
        if entry in pieces:
            continue
        pieces[entry] = len(pieces)
        if len(entry) > 1:
            words.append(entry)
    if len(pieces) > max_vocab:
        raise ValueError(f"vocab has {len(pieces)} entries with the base set, expected at most "
                         f"max_vocab = {max_vocab}")

    # Pre-tokenize into (longest-first) words, then single characters; WordLevel maps each
    # piece to its id. Special tokens are split off before this by the added-token matcher.
    alternatives = [re.escape(w) for w in sorted(words, key=len, reverse=True)]
    pattern = "|".join(alternatives + [r"[\s\S]"])
    backend = tokenizers.Tokenizer(models.WordLevel(vocab=pieces, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(
        tokenizers.Regex(pattern), behavior="isolated", invert=False)
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=eos_token,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, IM_END] if eos_token != IM_END else [IM_START],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str) -> list[str]:
    """`tokenizer.save_pretrained(path)`, plus the chat template written into
    `tokenizer_config.json` as well (older transformers/SGLang read it from there; newer ones
    from `chat_template.jinja`). Returns the file names written."""
    import json
    import os

    files = tokenizer.save_pretrained(path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if tokenizer.chat_template and os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["chat_template"] = tokenizer.chat_template
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
    return sorted(os.path.basename(str(p)) for p in files)
