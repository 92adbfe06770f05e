"""The on-disk embedding cache: hits never load the encoder, misses are encoded once, keys follow the encoder."""

import hashlib
import json
import multiprocessing
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from text2img.encoders import EmbeddingCache, TinyEncoder
from text2img.encoders.cache import cache_key
from text2img.types import TextEmbedding

CAPTIONS = ["grinning face", "man running facing right", "red apple", "", "a much longer caption than the others"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Spy:
    """Records what an encoder is asked to encode."""

    def __init__(self, encoder: TinyEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[str]] = []
        original = encoder.encode

        def encode(captions: Sequence[str]) -> TextEmbedding:
            self.calls.append(list(captions))
            return original(captions)

        monkeypatch.setattr(encoder, "encode", encode)


def assert_same(a: TextEmbedding, b: TextEmbedding) -> None:
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-4)


def test_misses_are_encoded_in_chunks_of_similar_length_and_come_back_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("text2img.encoders.cache.ENCODE_CHUNK", 2)
    encoder = TinyEncoder(max_length=16)
    spy = Spy(encoder, monkeypatch)
    cached = EmbeddingCache(tmp_path).lookup(encoder, CAPTIONS)
    assert spy.calls == [["", "red apple"], ["grinning face", "man running facing right"],
                         ["a much longer caption than the others"]]
    assert_same(cached, TinyEncoder(max_length=16).encode(CAPTIONS))


def test_miss_then_hit(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    first = cache.lookup(TinyEncoder(), CAPTIONS)
    assert (cache.stats.hits, cache.stats.misses) == (0, len(CAPTIONS))
    fresh = TinyEncoder()
    second = cache.lookup(fresh, CAPTIONS)
    assert (cache.stats.hits, cache.stats.misses) == (len(CAPTIONS), 0)
    assert not fresh.is_loaded
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.pooled, second.pooled)


def test_cached_values_equal_direct_encode(tmp_path: Path) -> None:
    encoder = TinyEncoder(max_length=16)
    cached = EmbeddingCache(tmp_path).lookup(encoder, CAPTIONS)
    assert cached.tokens.shape == (len(CAPTIONS), 16, 64) and cached.mask.dtype == torch.bool
    assert_same(cached, encoder.encode(CAPTIONS))
    reread = EmbeddingCache(tmp_path).lookup(TinyEncoder(max_length=16), list(reversed(CAPTIONS)))
    assert_same(reread, encoder.encode(list(reversed(CAPTIONS))))


def test_partial_miss_encodes_only_new_captions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = EmbeddingCache(tmp_path)
    cache.lookup(TinyEncoder(), CAPTIONS[:3])
    encoder = TinyEncoder()
    spy = Spy(encoder, monkeypatch)
    out = cache.lookup(encoder, CAPTIONS)
    assert spy.calls == [CAPTIONS[3:]]
    assert (cache.stats.hits, cache.stats.misses) == (3, 2)
    assert_same(out, TinyEncoder().encode(CAPTIONS))


def test_duplicates_are_encoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = TinyEncoder()
    spy = Spy(encoder, monkeypatch)
    cache = EmbeddingCache(tmp_path)
    out = cache.lookup(encoder, ["b", "a", "b", "b", "a"])
    assert spy.calls == [["b", "a"]]
    assert (cache.stats.hits, cache.stats.misses) == (0, 2)
    assert torch.equal(out.tokens[0], out.tokens[2]) and torch.equal(out.pooled[1], out.pooled[4])


def test_no_captions(tmp_path: Path) -> None:
    encoder = TinyEncoder()
    out = EmbeddingCache(tmp_path).lookup(encoder, [])
    assert out.tokens.shape == (0, 16, 64) and not encoder.is_loaded


@pytest.mark.parametrize(
    "change",
    [
        {"layer": -2}, {"template": "emoji: {caption}"}, {"max_length": 8}, {"seed": 1}, {"layers": "all"},
        {"layers": [0, -1], "combine": "concat"}, {"layers": [0, -1], "layer_norm": False}, {"keep_tokens": "caption"},
    ],
)
def test_changing_the_encoder_changes_the_key(tmp_path: Path, change: dict) -> None:
    cache = EmbeddingCache(tmp_path)
    cache.lookup(TinyEncoder(), CAPTIONS)
    changed = TinyEncoder(**change)
    assert cache_key(changed) != cache_key(TinyEncoder())
    out = cache.lookup(changed, CAPTIONS)
    assert cache.stats.misses == len(CAPTIONS)
    assert_same(out, changed.encode(CAPTIONS))
    assert len(list(tmp_path.glob("*/identity.json"))) == 2


def test_keys_written_before_the_layer_and_token_options_still_match() -> None:
    """Options added later are left out of the key at their defaults, so existing caches keep matching."""
    encoder = TinyEncoder()
    before = {
        name: value for name, value in encoder.identity().items()
        if name not in ("layer_mean", "chat_template", "system_prompt", "layers", "layer_norm", "combine", "keep_tokens")
    }
    assert cache_key(encoder) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]


def test_a_list_of_layers_is_cached_once(tmp_path: Path) -> None:
    cache, encoder = EmbeddingCache(tmp_path), TinyEncoder(layers=[0, 1, 2], combine="concat")
    out = cache.lookup(encoder, CAPTIONS)
    assert out.tokens.shape[-1] == 3 * 64 and len(list(tmp_path.glob("*/*.safetensors"))) == 1
    assert_same(cache.lookup(encoder, CAPTIONS), encoder.encode(CAPTIONS))
    assert cache.stats.hits == len(set(CAPTIONS)) and cache.stats.misses == 0


def test_unpadded_lookup_is_as_long_as_the_longest_shard_read(tmp_path: Path) -> None:
    cache, encoder = EmbeddingCache(tmp_path), TinyEncoder(max_length=16)
    padded = cache.lookup(encoder, ["ab", "abcd"])
    short = cache.lookup(encoder, ["ab", "abcd"], padded=False)
    assert padded.tokens.shape[1] == 16 and short.tokens.shape[1] == 5  # <bos> + 4 bytes
    assert_same(short.padded_to(16), padded)


def test_storage_layout(tmp_path: Path) -> None:
    encoder = TinyEncoder(max_length=16)
    EmbeddingCache(tmp_path).lookup(encoder, ["ab", "abcd"])
    folder = tmp_path / cache_key(encoder)
    assert json.loads((folder / "identity.json").read_text()) == encoder.identity()
    [shard] = folder.glob("*.safetensors")
    with safe_open(shard, framework="pt") as reader:
        assert json.loads(reader.metadata()["captions"]) == ["ab", "abcd"]
        assert reader.get_tensor("tokens").shape == (2, 5, 64)  # bos + 4 bytes, not max_length
        assert reader.get_tensor("tokens").dtype == torch.float32
        assert reader.get_tensor("mask").dtype == torch.bool
    assert not list(folder.glob(".*.tmp"))


def test_trainable_encoder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trainable"):
        EmbeddingCache(tmp_path).lookup(TinyEncoder(mode="full"), CAPTIONS)


def _race(root: str, barrier, out: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    cache = EmbeddingCache(root)
    encoder = TinyEncoder()
    barrier.wait(timeout=120)  # both processes are imported and ready: start the lookups together
    result = cache.lookup(encoder, CAPTIONS)
    torch.save({"tokens": result.tokens, "pooled": result.pooled, "misses": cache.stats.misses}, out)


@pytest.mark.slow  # two fresh interpreters racing for the cache lock: ~8 s
def test_two_processes_share_an_empty_cache(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    outs = [str(tmp_path / f"result{i}.pt") for i in range(2)]
    root = tmp_path / "cache"
    workers = [context.Process(target=_race, args=(str(root), barrier, out)) for out in outs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [worker.exitcode for worker in workers] == [0, 0]
    a, b = (torch.load(out, weights_only=True) for out in outs)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["pooled"], b["pooled"])
    # the file lock lets one encode while the other waits and then reads its shard
    assert sorted([a["misses"], b["misses"]]) == [0, len(CAPTIONS)]
    assert len(list(root.glob("*/*.safetensors"))) == 1
    cache = EmbeddingCache(root)
    encoder = TinyEncoder()
    assert_same(cache.lookup(encoder, CAPTIONS), TinyEncoder().encode(CAPTIONS))
    assert cache.stats.misses == 0 and not encoder.is_loaded
