"""The reference tokenizer is a fixed artifact: rebuilt byte-for-byte from the embedded corpus."""

from __future__ import annotations

import xxhash

from service.backends.reference.render import Encoder
from service.backends.reference.tokenizer import (
    SPECIAL_TOKENS,
    build_tokenizer_json,
    load_tokenizer,
    tokenizer_bytes,
    tokenizer_fingerprint,
    utf8_pieces,
)


def test_shipped_tokenizer_is_the_deterministic_build() -> None:
    # If this fails after a `tokenizers` upgrade changed the serialization, regenerate with
    # `python -m service.backends.reference.tokenizer`: the fingerprint changes with it, as it must.
    assert build_tokenizer_json().encode("utf-8") == tokenizer_bytes()


def test_fingerprint_is_the_hash_of_the_shipped_file() -> None:
    assert tokenizer_fingerprint() == xxhash.xxh3_128_hexdigest(tokenizer_bytes())


def test_vocabulary_size_and_special_tokens() -> None:
    tokenizer = load_tokenizer()
    assert 2000 <= tokenizer.get_vocab_size() <= 4096
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer.encode(token, add_special_tokens=False).ids == [token_id]


def test_golden_ids() -> None:
    encoder = Encoder(load_tokenizer())
    assert encoder.generation_prompt == encoder.encode("<|im_start|>") + encoder.encode("assistant\n")
    assert encoder.encode("<|im_start|>user\nHello world<|im_end|>\n")[:3] == [1, 808, 205]


def test_text_never_merges_across_special_tokens() -> None:
    encoder = Encoder(load_tokenizer())
    text = "ab<think>cd</think>ef<tool_call>{}</tool_call><|im_end|>"
    pieces = ["ab", "<think>", "cd", "</think>", "ef", "<tool_call>", "{}", "</tool_call>", "<|im_end|>"]
    assert encoder.encode(text) == [t for p in pieces for t in encoder.encode(p)]


def test_byte_table_decodes_exactly_even_when_split_inside_a_character() -> None:
    encoder = Encoder(load_tokenizer())
    text = "naïve café — 東京 🚀 plain ascii"
    ids = encoder.encode(text)
    assert encoder.bytes_of(ids).decode("utf-8") == text
    assert load_tokenizer().decode(ids) == text
    singles = utf8_pieces([encoder.bytes_of([t]) for t in ids])
    assert "".join(singles) == text
