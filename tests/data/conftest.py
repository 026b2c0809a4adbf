"""A tiny byte-level tokenizer for the data tests (the real ones live in tfd_jax.tokenizers)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tfd_jax.tokenizers.base import Tokenizer


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; id 256 is end-of-document."""

    kind = "test_bytes"
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return 257

    def _to_record(self, directory: Path) -> dict:
        return {}

    @classmethod
    def _from_record(cls, record: dict, directory: Path) -> "ByteTokenizer":
        return cls()


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()
