"""Data: generated corpora, loading, tokenisation, packing, the cache and batch order (CPU, offline)."""

import dataclasses
import json
import mmap
import multiprocessing
import pickle
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ablate import corpora
from ablate import data as data_mod
from ablate.data import (
    PackedData,
    decode,
    prepare,
    random_token_data,
    train_batches,
    val_batches,
)
from ablate.data_config import DataConfig, fingerprint

SEQ = 64


def stream_of(windows: np.ndarray) -> np.ndarray:
    """The flat token stream a (n, seq_len + 1) window view was cut from."""
    return np.concatenate([windows[:, :-1].ravel(), windows[-1, -1:]])


def documents(stream: np.ndarray, eot: int) -> list[np.ndarray]:
    """Split a packed stream at eot, dropping the empty pieces (leading eot and tail padding)."""
    cuts = np.flatnonzero(stream == eot)
    return [piece for piece in np.split(stream, cuts) if len(piece) > 1 or (len(piece) and piece[0] != eot)]


def is_memory_mapped(array: np.ndarray) -> bool:
    base = array
    while base is not None:
        if isinstance(base, np.memmap | mmap.mmap):
            return True
        base = getattr(base, "base", None)
    return False


def strip_eot(pieces: list[np.ndarray], eot: int) -> list[list[int]]:
    return [[int(t) for t in p if t != eot] for p in pieces]


@pytest.fixture(scope="module")
def stories_cfg(tmp_path_factory) -> DataConfig:
    cache = tmp_path_factory.mktemp("cache")
    return DataConfig(corpus_docs=300, tokenizer="bpe:512", val_tokens=2048, cache_dir=str(cache))


@pytest.fixture(scope="module")
def stories_data(stories_cfg) -> PackedData:
    return prepare(stories_cfg, SEQ)


# ----------------------------------------------------------------------------- generated corpora


def test_stories_are_deterministic_per_seed_and_split():
    assert corpora.stories(40, seed=0) == corpora.stories(40, seed=0)
    assert corpora.stories(40, seed=0) != corpora.stories(40, seed=1)
    assert set(corpora.stories(40, seed=0)).isdisjoint(corpora.stories(40, seed=0, split="validation"))
    assert corpora.stories(10, seed=3, start=5) == corpora.stories(15, seed=3)[5:]


def test_stories_refer_back_to_entities_introduced_early():
    for i in range(200):
        story = corpora.story(0, "train", i)
        opening, ending = story.text[: len(story.text) // 4], story.text[-len(story.text) // 4 :]
        assert story.hero in opening and story.item in opening
        assert story.hero in ending and story.friend in ending
        mentions = [m.start() for m in re.finditer(re.escape(story.item), story.text)]
        assert len(mentions) >= 2 and mentions[-1] - mentions[0] > len(story.text) // 3


def test_stories_use_a_few_hundred_words():
    words = {w.lower() for text in corpora.stories(2000, seed=0) for w in re.findall(r"[A-Za-z']+", text)}
    assert 150 <= len(words) <= 600


def test_mqar_queries_are_answerable_from_earlier_bindings():
    spec = corpora.MQARSpec(pairs=8, vocab=64)
    seqs = corpora.mqar(spec, 48, n=50, seed=0)
    assert seqs.shape == (50, 48) and (seqs[:, -1] == 0).all()
    for seq in seqs:
        keys, values = seq[0:16:2], seq[1:16:2]
        assert (
            len(set(keys.tolist())) == 8 and all(map(spec.is_key, keys)) and all(map(spec.is_value, values))
        )
        bound = dict(zip(keys.tolist(), values.tolist(), strict=True))
        queries = seq[16:-1]
        queries = queries[: len(queries) // 2 * 2].reshape(-1, 2)
        assert len(queries) == (48 - 1 - 16) // 2
        for key, value in queries:
            assert bound[int(key)] == value


def test_mqar_is_deterministic_per_seed_and_split():
    spec = corpora.MQARSpec()
    first = corpora.mqar(spec, 128, 20, seed=0)
    assert np.array_equal(first, corpora.mqar(spec, 128, 20, seed=0))
    assert not np.array_equal(first, corpora.mqar(spec, 128, 20, seed=1))
    assert not np.array_equal(first, corpora.mqar(spec, 128, 20, seed=0, split="validation"))
    assert np.array_equal(first[7:], corpora.mqar(spec, 128, 13, seed=0, start=7))


# ----------------------------------------------------------------------------- packing


def test_packing_loses_no_tokens_and_separates_documents_with_eot(tmp_path):
    cfg = DataConfig(corpus_docs=40, tokenizer="bytes", val_tokens=256, cache_dir=str(tmp_path))
    packed = prepare(cfg, 32, progress=False)
    expected = [256]
    for text in corpora.stories(40, seed=0):
        expected += [*text.encode(), 256]
    stream = stream_of(packed.train)
    assert len(stream) - 1 == packed.n_train_sequences() * 32  # every position after the first is a target
    assert 0 <= len(stream) - len(expected) < 32  # the tail window is padded, with eot only
    assert stream[: len(expected)].tolist() == expected
    assert (stream[len(expected) :] == 256).all()


def test_bpe_packing_round_trips_every_document(stories_data):
    pieces = strip_eot(documents(stream_of(stories_data.train), stories_data.eot_id), stories_data.eot_id)
    assert [decode(stories_data, p) for p in pieces] == corpora.stories(300, seed=0)
    assert stories_data.train.dtype == np.uint16 and stories_data.vocab_size <= 512


def test_validation_set_is_fixed_in_size_and_drawn_from_its_own_stream(stories_data, stories_cfg):
    assert stories_data.n_val_sequences() * SEQ == stories_cfg.val_tokens
    val_text = decode(stories_data, stream_of(stories_data.val))
    assert corpora.stories(1, seed=0, split="validation")[0] in val_text
    assert corpora.stories(1, seed=0)[0] not in val_text


def test_mqar_windows_hold_one_sequence_each(tmp_path):
    cfg = DataConfig(source="mqar", corpus_docs=30, mqar_pairs=8, mqar_vocab=64, val_tokens=640)
    packed = prepare(dataclasses.replace(cfg, cache_dir=str(tmp_path)), 48, progress=False)
    expected = corpora.mqar(corpora.MQARSpec(pairs=8, vocab=64), 48, 30, seed=0)
    assert packed.n_train_sequences() == 30 and packed.vocab_size == 64 and packed.eot_id == 0
    assert np.array_equal(packed.train[:, 1:], expected)  # (x[0] is the previous sequence's eot)
    assert packed.n_val_sequences() == 14


def test_max_train_tokens_truncates_to_whole_windows(stories_cfg):
    packed = prepare(dataclasses.replace(stories_cfg, max_train_tokens=1000), SEQ, progress=False)
    assert packed.n_train_sequences() == 1000 // SEQ


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused_without_retokenising(tmp_path, monkeypatch):
    cfg = DataConfig(corpus_docs=200, tokenizer="bpe:400", val_tokens=1024, cache_dir=str(tmp_path))
    first = prepare(cfg, SEQ, progress=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data_mod, "_train_bpe", forbidden)
    monkeypatch.setattr(data_mod, "_tokenise", forbidden)
    second = prepare(cfg, SEQ, progress=False)
    assert second.fingerprint == first.fingerprint and second.path == first.path
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert is_memory_mapped(second.train) and is_memory_mapped(second.val)
    monkeypatch.undo()
    monkeypatch.setattr(data_mod, "_train_bpe", forbidden)  # a new seq_len re-packs with the cached BPE
    assert prepare(cfg, 32, progress=False).vocab_size == first.vocab_size


def test_a_failed_build_leaves_no_partial_cache(tmp_path, monkeypatch):
    cfg = DataConfig(corpus_docs=20, tokenizer="bytes", val_tokens=256, cache_dir=str(tmp_path))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(data_mod, "_pack", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(cfg, 32, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
    monkeypatch.undo()
    assert prepare(cfg, 32, progress=False).n_train_sequences() > 0


def _prepare_in_child(cfg: DataConfig) -> tuple[str, bytes]:
    packed = prepare(cfg, 32, progress=False)
    return packed.fingerprint, stream_of(packed.train).tobytes()


def test_concurrent_prepare_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    cfg = DataConfig(corpus_docs=60, tokenizer="bpe:300", val_tokens=256, cache_dir=str(tmp_path / "cache"))
    builds, real_build = tmp_path / "builds.txt", data_mod._build

    def counted_build(*args, **kwargs):
        with builds.open("a") as f:
            f.write("build\n")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(data_mod, "_build", counted_build)  # inherited by the forked workers
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_prepare_in_child, [cfg] * 3)
    assert builds.read_text().count("build") == 1
    assert len(set(results)) == 1
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_fingerprint_tracks_what_changes_the_arrays(tmp_path):
    base = DataConfig(cache_dir=str(tmp_path / "a"))
    key = fingerprint(base, 256)
    assert key == fingerprint(dataclasses.replace(base, cache_dir=str(tmp_path / "b")), 256)
    assert key == fingerprint(DataConfig(), 256)
    changed = [
        fingerprint(dataclasses.replace(base, source="mqar"), 256),
        fingerprint(dataclasses.replace(base, tokenizer="bpe:1024"), 256),
        fingerprint(dataclasses.replace(base, tokenizer="bytes"), 256),
        fingerprint(base, 128),
        fingerprint(dataclasses.replace(base, corpus_seed=1), 256),
        fingerprint(dataclasses.replace(base, corpus_docs=100), 256),
        fingerprint(dataclasses.replace(base, max_train_tokens=10_000), 256),
        fingerprint(dataclasses.replace(base, val_tokens=1024), 256),
    ]
    assert len({key, *changed}) == len(changed) + 1


def test_fingerprint_of_local_files_follows_their_content(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n')
    cfg = DataConfig(source=str(path))
    before = fingerprint(cfg, 64)
    path.write_text('{"text": "one two"}\n')
    assert fingerprint(cfg, 64) != before


# ----------------------------------------------------------------------------- sources


DOCS = [f"Document {i}: the {'quick ' * (i % 5)}brown fox jumps over dog number {i}." for i in range(60)]


def byte_documents(windows: np.ndarray) -> list[str]:
    """The documents of a window array packed with the byte tokenizer (eot = 256)."""
    return [bytes(d).decode() for d in strip_eot(documents(stream_of(windows), 256), 256)]


def write_docs(directory: Path, fmt: str, docs: list[str], stem: str = "docs") -> Path:
    path = directory / f"{stem}.{fmt}"
    if fmt == "txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    elif fmt == "json":
        path.write_text(json.dumps([{"text": d} for d in docs]))
    else:
        pq.write_table(pa.table({"text": docs}), path)
    return path


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "parquet"])
def test_local_files_load_with_a_carved_validation_split(tmp_path, fmt):
    path = write_docs(tmp_path, fmt, DOCS)
    cfg = DataConfig(source=str(path), tokenizer="bytes", val_fraction=0.1, val_tokens=4096)
    with pytest.warns(UserWarning, match="fewer than val_tokens=4096"):  # all of it is used
        packed = prepare(dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache")), SEQ, progress=False)
    train, val = byte_documents(packed.train), byte_documents(packed.val)
    assert len(val) == 6 and set(train).isdisjoint(val) and sorted(train + val) == sorted(DOCS)
    assert train == [d for d in DOCS if d not in val]  # training documents keep their order


@pytest.mark.filterwarnings("ignore:.*fewer than val_tokens")
def test_a_directory_with_split_files_uses_its_validation_file(tmp_path):
    write_docs(tmp_path, "jsonl", DOCS[:50], stem="train")
    write_docs(tmp_path, "jsonl", DOCS[50:], stem="validation")
    cfg = DataConfig(source=str(tmp_path), tokenizer="bytes", val_tokens=4096, cache_dir=str(tmp_path / "c"))
    packed = prepare(cfg, SEQ, progress=False)
    assert byte_documents(packed.val) == DOCS[50:]


@pytest.mark.filterwarnings("ignore:.*fewer than val_tokens")
def test_hub_dataset_and_tokenizer_paths_without_network(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(name, subset=None, revision=None, **kwargs):
        calls.append((name, subset, revision))
        train = datasets.Dataset.from_dict({"story": DOCS[:50]})
        return datasets.DatasetDict(
            {"train": train, "validation": datasets.Dataset.from_dict({"story": DOCS[50:]})}
        )

    tok = data_mod._train_bpe([DOCS], 300)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(
        data_mod,
        "_from_hub",
        lambda name, revision=None: tok if (name, revision) == ("org/tok", "v2") else None,
    )
    cfg = DataConfig(
        source="hf:org/stories:small",
        text_field="story",
        tokenizer="hf:org/tok",
        val_tokens=512,
        revision="abc123",
        tokenizer_revision="v2",
    )
    packed = prepare(dataclasses.replace(cfg, cache_dir=str(tmp_path)), 32, progress=False)
    assert calls == [("org/stories", "small", "abc123")]
    # a pinned revision is part of the cache key: another revision is other data
    for change in ({"revision": "def456"}, {"tokenizer_revision": "v3"}, {"revision": None}):
        assert fingerprint(dataclasses.replace(cfg, **change), 32) != fingerprint(cfg, 32), change
    assert packed.eot_id == tok.token_to_id("<|endoftext|>") and packed.vocab_size == tok.get_vocab_size()
    assert decode(packed, packed.val[0]).startswith("<|endoftext|>" + DOCS[50])


def test_a_local_tokenizer_file_works_as_hf_tokenizer(tmp_path, stories_data):
    cfg = DataConfig(corpus_docs=30, tokenizer=f"hf:{stories_data.path / 'tokenizer.json'}", val_tokens=256)
    packed = prepare(dataclasses.replace(cfg, cache_dir=str(tmp_path)), SEQ, progress=False)
    assert packed.vocab_size == stories_data.vocab_size
    assert np.array_equal(packed.train[:3], stories_data.train[:3])


# ----------------------------------------------------------------------------- batches


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_data_order_depends_only_on_the_data_seed(stories_cfg, stories_data):
    again = prepare(stories_cfg, SEQ, progress=False)
    first = take(train_batches(stories_data, 8, seed=0), 5)
    torch.manual_seed(1234)
    same = take(train_batches(again, 8, seed=0), 5)
    other = take(train_batches(stories_data, 8, seed=1), 5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, same, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def windows_seen(batches) -> list[tuple[int, ...]]:
    return sorted(tuple(r) for x, y in batches for r in torch.cat([x, y[:, -1:]], 1).tolist())


def test_train_batches_shift_targets_and_cover_each_epoch_once():
    packed = random_token_data(1000, 16, n_seq=12, seed=0)
    batches = take(train_batches(packed, 4, seed=7), 6)
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
    every_window = sorted(tuple(r) for r in packed.train.astype(np.int64).tolist())
    assert windows_seen(batches[:3]) == every_window and windows_seen(batches[3:]) == every_window


def test_train_batches_resume_at_a_later_batch():
    packed = random_token_data(1000, 8, n_seq=10, seed=0)
    full = take(train_batches(packed, 3, seed=5), 12)
    for start in (1, 3, 7):
        resumed = take(train_batches(packed, 3, seed=5, start_batch=start), 12 - start)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(full[start:], resumed, strict=True))


def test_val_batches_are_fixed_and_complete(stories_data):
    first = list(val_batches(stories_data, 5))
    second = list(val_batches(stories_data, 5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    assert sum(y.numel() for _, y in first) == stories_data.n_val_sequences() * SEQ
    assert len(first[-1][0]) == (stories_data.n_val_sequences() % 5 or 5)
    assert all(len(x) == 5 for x, _ in first[:-1])


def test_random_token_data_sizes_and_dtypes(tmp_path):
    small = random_token_data(50257, 32, n_seq=10, seed=0)
    assert small.train.shape == (10, 33) and small.train.dtype == np.uint16 and small.n_val_sequences() == 1
    assert np.array_equal(small.train, random_token_data(50257, 32, n_seq=10, seed=0).train)
    assert random_token_data(70000, 8, n_seq=2).train.dtype == np.uint32
    cfg = DataConfig(source="random:300", corpus_docs=6, val_tokens=64, cache_dir=str(tmp_path))
    packed = prepare(cfg, 16, progress=False)
    assert packed.n_train_sequences() == 6 and packed.n_val_sequences() == 4 and packed.vocab_size == 300
    assert not list(tmp_path.iterdir())  # never cached


def test_cached_data_pickles_as_its_path(stories_data):
    blob = pickle.dumps(stories_data)
    assert len(blob) < 10_000
    back = pickle.loads(blob)
    assert back.fingerprint == stories_data.fingerprint and np.array_equal(back.train, stories_data.train)
    mem = random_token_data(100, 8, n_seq=4)
    assert np.array_equal(pickle.loads(pickle.dumps(mem)).train, mem.train)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("source", "s3://bucket/data"),
        ("source", "/no/such/file.jsonl"),
        ("source", "random:1"),
        ("source", "hf:"),
        ("tokenizer", "bpe:100"),
        ("tokenizer", "gpt2"),
        ("val_fraction", 0.0),
        ("val_fraction", 0.9),
        ("corpus_docs", 0),
        ("corpus_docs", "100"),
        ("val_tokens", -1),
        ("max_train_tokens", 0),
        ("txt_sample_by", "sentence"),
        ("mqar_vocab", 20),
        ("val_split", "train"),
        ("text_field", ""),
        ("corpus_seed", True),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DataConfig\.{field}"):
        DataConfig(**{field: value})


def test_unsupported_files_and_typos_are_rejected(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"source.*unsupported file types \['\.csv'\]"):
        DataConfig(source=str(tmp_path / "*.csv"))
    cfg = DataConfig()
    with pytest.raises(AttributeError):
        cfg.sorce = "mqar"  # slots: a typo cannot add a field


def test_prepare_time_errors_name_the_field(tmp_path):
    path = write_docs(tmp_path, "jsonl", DOCS)
    with pytest.raises(ValueError, match=r"DataConfig\.text_field.*columns \['text', 'id'\]"):
        prepare(DataConfig(source=str(path), text_field="body", cache_dir=str(tmp_path)), 32, progress=False)
    with pytest.raises(ValueError, match=r"DataConfig\.train_split.*splits \['train'\]"):
        prepare(DataConfig(source=str(path), train_split="all", cache_dir=str(tmp_path)), 32, progress=False)
    with pytest.raises(ValueError, match=r"DataConfig\.max_train_tokens"):
        prepare(DataConfig(max_train_tokens=100, cache_dir=str(tmp_path)), 256, progress=False)
    with pytest.raises(ValueError, match=r"DataConfig\.mqar_pairs"):
        prepare(DataConfig(source="mqar", cache_dir=str(tmp_path)), 16, progress=False)
