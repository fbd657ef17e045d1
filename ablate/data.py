"""Data for a trial: load documents, tokenise them once, pack them into fixed-length windows, cache the
result memory-mapped, and serve batches in an order that depends only on the data seed.

Sources (`DataConfig.source`):
    "stories"            generated stories with long-range references (ablate.corpora), offline
    "mqar"               generated multi-query associative recall sequences (token ids, no tokenizer)
    "hf:<name>[:<cfg>]"  a Hugging Face hub dataset, e.g. hf:roneneldan/TinyStories
    "pkg:<name>[+...]"   real text rebuilt from installed registry packages (ablate.packaged), offline
    a path or glob       local .txt / .json / .jsonl / .parquet files, or a directory of them
    "random:<vocab>"     uniform random tokens in memory (benchmarks only, never cached)

Packing: every document (stripped of edge whitespace; empty ones are skipped) is tokenised and followed by
the end-of-text token (eot); the stream starts with one eot, so the first token of every document is a
target too. Windows of seq_len + 1 tokens are cut at a stride of seq_len (x = w[:-1], y = w[1:]): every
token after the leading eot is a target exactly once. The last window is padded with eot (those padding
targets are eot -> eot; fewer than seq_len of them). Nothing is lost unless `max_train_tokens` truncates the
training stream; the validation stream is cut to ceil(val_tokens / seq_len) windows.

Cache: <cache_dir>/<fingerprint>/{train.npy, val.npy, meta.json, tokenizer.json}. The fingerprint covers
everything that changes the arrays (source and its files, splits, tokenizer, seq_len, token limits, code
version). A build runs under a file lock in a temporary directory that is renamed into place when
complete, so concurrent callers build once and a crash never leaves a partial cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tokenizers
from filelock import FileLock, Timeout

from ablate import corpora, packaged
from ablate.data_config import (
    DATA_VERSION,
    EOT_CANDIDATES,
    EOT_TEXT,
    FILE_BUILDERS,
    GENERATED,
    DataConfig,
    bad_value,
    cache_root,
    digest,
    fingerprint,
    local_files,
    source_kind,
    tokenizer_identity,
    tokenizer_kind,
)

# torch loads with the first batch (preparing data needs only numpy), and Hugging Face datasets where
# data is built (0.4 s a process): a trial only maps data prepared before it started
if TYPE_CHECKING:
    import datasets
    import torch

FIRST_CHUNK, MAX_CHUNK = 2048, 262_144  # documents per tokenisation chunk (grows geometrically)


@dataclass(eq=False)
class PackedData:
    """Packed token windows: `train` and `val` are read-only (n_seq, seq_len + 1) views of a flat stream."""

    train: np.ndarray
    val: np.ndarray
    seq_len: int
    vocab_size: int
    eot_id: int
    fingerprint: str
    path: Path | None = None  # the cache directory; None for in-memory data
    meta: dict = field(default_factory=dict, repr=False)

    def n_train_sequences(self) -> int:
        return int(self.train.shape[0])

    def n_val_sequences(self) -> int:
        return int(self.val.shape[0])

    def __reduce__(self):
        # Cached data pickles as its path (cheap to send to workers); in-memory data as its arrays.
        if self.path is not None:
            return (load_packed, (self.path,))
        fields = (self.train, self.val, self.seq_len, self.vocab_size, self.eot_id, self.fingerprint)
        return (PackedData, (*fields, None, self.meta))


# ----------------------------------------------------------------------------- document sources


@dataclass
class _Split:
    """Documents of one split, fetched by index range so tokenisation can stop early."""

    name: str
    n_docs: int | None  # None: unbounded (generated validation split)
    rows: Callable[[int, int], datasets.Dataset]  # documents [start, stop) as a Dataset
    texts: Callable[[int, int], list[str]] | None  # their texts (None: already token ids)
    provenance: dict = field(default_factory=dict)  # recorded in meta.json (packaged corpora)


def _story_texts(seed: int, split: str, start: int, stop: int) -> list[str]:
    return corpora.stories(stop - start, seed, split, start=start)


def _story_rows(seed: int, split: str, start: int, stop: int) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({"text": _story_texts(seed, split, start, stop)})


def _mqar_rows(spec: corpora.MQARSpec, length: int, seed: int, split: str, start: int, stop: int):
    import datasets

    ids = corpora.mqar(spec, length, stop - start, seed, split, start=start)  # each ends in eot
    features = datasets.Features({"ids": datasets.List(datasets.Value("uint16"))})
    return datasets.Dataset.from_dict({"ids": ids.tolist()}, features=features)


def _generated_splits(cfg: DataConfig, seq_len: int) -> tuple[_Split, _Split]:
    def split(name: str, n_docs: int | None) -> _Split:
        if cfg.source == "stories":
            args = (cfg.corpus_seed, name)
            return _Split(name, n_docs, partial(_story_rows, *args), partial(_story_texts, *args))
        spec = corpora.MQARSpec(pairs=cfg.mqar_pairs, vocab=cfg.mqar_vocab)
        # One sequence + its eot fills a window exactly, so no query is cut off from its bindings.
        return _Split(name, n_docs, partial(_mqar_rows, spec, seq_len, cfg.corpus_seed, name), None)

    return split("train", cfg.corpus_docs), split("validation", None)


def _load_dataset_dict(cfg: DataConfig, root: Path) -> datasets.DatasetDict:
    import datasets

    if source_kind(cfg.source) == "hf":
        name, _, subset = cfg.source.removeprefix("hf:").partition(":")
        return datasets.load_dataset(name, subset or None, revision=cfg.revision)
    files = local_files(cfg.source)
    builder = FILE_BUILDERS[files[0].suffix]
    options = {"sample_by": cfg.txt_sample_by} if builder == "text" else {}
    hf_cache = str(root / "hf")
    if Path(cfg.source).expanduser().is_dir():  # split names inferred from file names (train*, validation*)
        return datasets.load_dataset(str(Path(cfg.source).expanduser()), cache_dir=hf_cache, **options)
    return datasets.load_dataset(builder, data_files=[str(p) for p in files], cache_dir=hf_cache, **options)


def _carve(ds: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    n_val = max(1, round(len(ds) * fraction))
    if n_val >= len(ds):
        raise bad_value("val_fraction", fraction, f"leaves no training documents out of {len(ds)}")
    is_val = np.zeros(len(ds), dtype=bool)
    is_val[np.random.default_rng(seed).choice(len(ds), n_val, replace=False)] = True
    return ds.select(np.flatnonzero(~is_val)), ds.select(np.flatnonzero(is_val))


def _loaded_splits(cfg: DataConfig, root: Path, progress: bool) -> tuple[_Split, _Split]:
    dd = _load_dataset_dict(cfg, root)
    if cfg.train_split not in dd:
        raise bad_value("train_split", cfg.train_split, f"{cfg.source} has splits {sorted(dd)}")
    train, val = dd[cfg.train_split], dd.get(cfg.val_split)
    if cfg.text_field not in train.column_names:
        raise bad_value("text_field", cfg.text_field, f"{cfg.source} has columns {train.column_names}")
    if val is None:
        _say(progress, f"no {cfg.val_split!r} split: carving {cfg.val_fraction:g} of {cfg.train_split!r}")
        train, val = _carve(train, cfg.val_fraction, cfg.corpus_seed)

    return _dataset_split("train", train, cfg.text_field), _dataset_split("validation", val, cfg.text_field)


def _dataset_split(
    name: str, ds: datasets.Dataset, text_field: str, provenance: dict | None = None
) -> _Split:
    def rows(start: int, stop: int) -> datasets.Dataset:
        return ds.select(range(start, stop))

    def texts(start: int, stop: int) -> list[str]:
        return ds[start:stop][text_field]

    return _Split(name, len(ds), rows, texts, provenance or {})


def _packaged_splits(cfg: DataConfig, progress: bool) -> tuple[_Split, _Split]:
    import datasets

    docs = packaged.documents(cfg.source, cfg.val_fraction, cfg.corpus_seed)
    _say(progress, f"{cfg.source}: {len(docs.train)} training and {len(docs.val)} validation documents")
    field_ = cfg.text_field  # the configured column name, so tokenising reads these rows as usual
    train = datasets.Dataset.from_dict({field_: docs.train})
    val = datasets.Dataset.from_dict({field_: docs.val})
    return _dataset_split("train", train, field_, docs.provenance), _dataset_split("validation", val, field_)


def _splits(cfg: DataConfig, seq_len: int, root: Path, progress: bool) -> tuple[_Split, _Split]:
    if cfg.source in GENERATED:
        return _generated_splits(cfg, seq_len)
    if source_kind(cfg.source) == "pkg":
        return _packaged_splits(cfg, progress)
    return _loaded_splits(cfg, root, progress)


# ----------------------------------------------------------------------------- tokenizers


@dataclass
class _Codec:
    """Text -> token ids. `tokenizer` is None for raw UTF-8 bytes (eot = 256)."""

    name: str
    vocab_size: int
    eot_id: int
    tokenizer: tokenizers.Tokenizer | None = None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.tokenizer is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def _codec_from_tokenizer(name: str, tok: tokenizers.Tokenizer) -> _Codec:
    eot = next((i for t in EOT_CANDIDATES if (i := tok.token_to_id(t)) is not None), None)
    if eot is None:
        raise bad_value(
            "tokenizer", name, f"has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)})"
        )
    return _Codec(name, tok.get_vocab_size(with_added_tokens=True), eot, tok)


def _train_bpe(texts: Iterable[list[str]], vocab_size: int) -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _text_batches(split: _Split, batch: int = 1000) -> Iterator[list[str]]:
    assert split.n_docs is not None and split.texts is not None
    for start in range(0, split.n_docs, batch):
        yield [(t or "").strip() for t in split.texts(start, min(start + batch, split.n_docs))]


def _bpe_codec(cfg: DataConfig, train: _Split, root: Path, progress: bool) -> _Codec:
    key = digest(tokenizer_identity(cfg))
    path = root / "tokenizers" / key / "tokenizer.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent.with_suffix(".lock"), progress, f"tokenizer {key}"):
            if not path.exists():
                _say(progress, f"training {cfg.tokenizer} on {train.n_docs} {train.name} documents")
                tok = _train_bpe(_text_batches(train), int(tokenizer_kind(cfg.tokenizer)[1]))
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tok.save(str(tmp))
                os.replace(tmp, path)
    return _codec_from_tokenizer(cfg.tokenizer, tokenizers.Tokenizer.from_file(str(path)))


def _codec(cfg: DataConfig, train: _Split, root: Path, progress: bool) -> _Codec:
    if cfg.source == "mqar":
        return _Codec("mqar-native", cfg.mqar_vocab, 0)
    kind, arg = tokenizer_kind(cfg.tokenizer)
    if kind == "bytes":
        return _Codec("bytes", 257, 256)
    if kind == "bpe":
        return _bpe_codec(cfg, train, root, progress)
    if Path(arg).is_file():
        return _codec_from_tokenizer(cfg.tokenizer, tokenizers.Tokenizer.from_file(arg))
    return _codec_from_tokenizer(cfg.tokenizer, _from_hub(arg, cfg.tokenizer_revision))


def _from_hub(name: str, revision: str | None = None) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_pretrained(name, revision=revision or "main")


def token_dtype(vocab_size: int) -> np.dtype:
    """The storage dtype for token ids: uint16 for vocabularies up to 65535, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


# ----------------------------------------------------------------------------- tokenise and pack


def _encode_rows(batch: dict, codec: _Codec, text_field: str) -> dict:
    texts = [t.strip() for t in batch[text_field] if t and not t.isspace()]  # empty documents are dropped
    return {"ids": [[*ids, codec.eot_id] for ids in codec.encode(texts)]}


def _count_tokens(ds: datasets.Dataset) -> int:
    lengths = ds.with_format("arrow")[:]["ids"]  # (n_docs,) list column
    return int(sum(len(chunk.flatten()) for chunk in lengths.chunks))


def _flat_ids(parts: list[datasets.Dataset]) -> Iterator[np.ndarray]:
    for part in parts:
        for batch in part.with_format("arrow").iter(batch_size=65536):
            for chunk in batch.column("ids").chunks:
                yield chunk.flatten().to_numpy(zero_copy_only=False)


def _tokenise(split: _Split, codec: _Codec, text_field: str, need: float, first_chunk: int, work: Path):
    """Tokenise `split` in growing chunks of documents until `need` tokens (inf: all).

    Returns (parts, documents read, tokens including each document's eot)."""
    import datasets

    features = datasets.Features({"ids": datasets.List(datasets.Value(str(token_dtype(codec.vocab_size))))})
    parts, total, start, size = [], 0, 0, first_chunk
    while total < need and (split.n_docs is None or start < split.n_docs):
        stop = start + size if split.n_docs is None else min(start + size, split.n_docs)
        rows = split.rows(start, stop)
        if split.texts is not None:
            name = f"{split.name}-{len(parts):04d}"
            rows = rows.map(
                _encode_rows,
                batched=True,
                remove_columns=rows.column_names,
                features=features,
                fn_kwargs={"codec": codec, "text_field": text_field},
                load_from_cache_file=False,
                cache_file_name=str(work / f"{name}.arrow"),
                new_fingerprint=f"{work.name}-{name}",
                desc=f"tokenising {split.name} {start}-{stop}",
            )
        total += _count_tokens(rows)
        parts.append(rows)
        start, size = stop, min(2 * size, MAX_CHUNK)
    return parts, start, total


def _pack(
    parts: list[datasets.Dataset], tokens: int, path: Path, *, eot: int, seq_len: int, max_windows: float
):
    """Write [eot] + tokens (each document already ends in eot) as windows, padding the tail with eot."""
    available = 1 + tokens
    n_windows = int(min(math.ceil((available - 1) / seq_len), max_windows))
    length = n_windows * seq_len + 1
    dtype = parts[0].features["ids"].feature.dtype
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(length,))
    out[0], pos = eot, 1
    for ids in _flat_ids(parts):
        take = min(len(ids), length - pos)
        out[pos : pos + take] = ids[:take]
        pos += take
        if pos == length:
            break
    out[pos:] = eot
    out.flush()
    del out
    return {
        "windows": n_windows,
        "targets": n_windows * seq_len,
        "tokens_available": available,
        "tokens_used": pos,
        "padding": length - pos,
    }


def _pack_splits(
    cfg: DataConfig, seq_len: int, splits: tuple[_Split, _Split], codec: _Codec, out: Path, progress: bool
) -> dict:
    work = out / "work"
    work.mkdir()
    limits = {
        "train": cfg.max_train_tokens // seq_len if cfg.max_train_tokens else math.inf,
        "validation": math.ceil(cfg.val_tokens / seq_len),
    }
    stats, first_chunk = {}, FIRST_CHUNK
    for split, file in zip(splits, ("train.npy", "val.npy"), strict=True):
        need = limits[split.name] * seq_len
        parts, docs, tokens = _tokenise(split, codec, cfg.text_field, need, first_chunk, work)
        _say(progress, f"{split.name}: {docs} documents, {tokens} tokens (with eot)")
        if tokens == 0:
            raise ValueError(f"source {cfg.source!r}: the {split.name} split has no non-empty documents")
        packed = _pack(
            parts, tokens, out / file, eot=codec.eot_id, seq_len=seq_len, max_windows=limits[split.name]
        )
        stats[split.name] = {"docs_tokenised": docs, **packed}
        del parts
        # Validation needs few documents: size its first chunk from the training tokens per document.
        first_chunk = min(MAX_CHUNK, 8 + math.ceil(1.2 * limits["validation"] * seq_len * docs / tokens))
    shutil.rmtree(work)
    if stats["validation"]["targets"] - stats["validation"]["padding"] < cfg.val_tokens:
        warnings.warn(
            f"source {cfg.source!r}: the validation split holds fewer than val_tokens="
            f"{cfg.val_tokens} tokens; using all {stats['validation']['tokens_used'] - 1}",
            stacklevel=3,
        )
    return stats


# ----------------------------------------------------------------------------- cache


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[data] {message}", file=sys.stderr, flush=True)


@contextmanager
def _locked(path: Path, progress: bool, what: str) -> Iterator[None]:
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(progress, f"waiting for another process to finish {what}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def _meta(cfg: DataConfig, seq_len: int, key: str, codec: _Codec, stats: dict) -> dict:
    import datasets

    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "cache_dir"}
    versions = {
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }
    return {
        "fingerprint": key,
        "data_version": DATA_VERSION,
        "seq_len": seq_len,
        "vocab_size": codec.vocab_size,
        "eot_id": codec.eot_id,
        "tokenizer": codec.name,
        "dtype": str(token_dtype(codec.vocab_size)),
        "config": config,
        **stats,
        "created_unix": time.time(),
        "versions": versions,
    }


def _build(cfg: DataConfig, seq_len: int, final: Path, progress: bool) -> None:
    """Build the cache for `final` in a temporary directory, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        splits = _splits(cfg, seq_len, final.parent, progress)
        codec = _codec(cfg, splits[0], final.parent, progress)
        stats = _pack_splits(cfg, seq_len, splits, codec, tmp, progress)
        if splits[0].provenance:
            stats["provenance"] = splits[0].provenance
        if codec.tokenizer is not None:
            codec.tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "meta.json").write_text(json.dumps(_meta(cfg, seq_len, final.name, codec, stats), indent=2))
        _fsync_files(tmp)  # the rename below must never publish data that is not on disk yet
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_files(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())


def _clear_leftovers(root: Path, key: str) -> None:
    # Only called while holding the lock for `key`: anything here is from a build that died.
    for stale in [*root.glob(f".tmp-{key}-*"), *([root / key] if (root / key).exists() else [])]:
        shutil.rmtree(stale, ignore_errors=True)


def _check_seq_len(cfg: DataConfig, seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if cfg.max_train_tokens is not None and cfg.max_train_tokens < seq_len:
        raise bad_value("max_train_tokens", cfg.max_train_tokens, f"must be at least seq_len={seq_len}")
    if cfg.source == "mqar" and seq_len - 1 < 2 * cfg.mqar_pairs + 2:
        raise bad_value(
            "mqar_pairs", cfg.mqar_pairs, f"needs seq_len >= 2*mqar_pairs+3 for queries; seq_len={seq_len}"
        )


def prepare(cfg: DataConfig, seq_len: int, *, progress: bool = True) -> PackedData:
    """Tokenise and pack `cfg`'s data into windows of seq_len + 1 tokens, once; later calls reuse the cache.

    Safe to call from several processes at once: one builds under a file lock, the others wait and load.
    """
    _check_seq_len(cfg, seq_len)
    if source_kind(cfg.source) == "random":
        n_seq = cfg.max_train_tokens // seq_len if cfg.max_train_tokens else cfg.corpus_docs
        vocab = int(cfg.source.removeprefix("random:"))
        n_val = math.ceil(cfg.val_tokens / seq_len)
        return random_token_data(vocab, seq_len, n_seq, seed=cfg.corpus_seed, n_val_seq=n_val)
    key, root = fingerprint(cfg, seq_len), cache_root(cfg)
    final = root / key
    if not (final / "meta.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f"{key}.lock", progress, f"preparing data {key}"):
            if not (final / "meta.json").exists():
                _clear_leftovers(root, key)
                started = time.perf_counter()
                _say(progress, f"preparing {cfg.source} for seq_len {seq_len} in {final}")
                with _hf_progress_bars(progress):
                    _build(cfg, seq_len, final, progress)
                _say(progress, f"prepared {key} in {time.perf_counter() - started:.1f}s")
    data = load_packed(final)
    _say(
        progress,
        f"data {key}: {data.n_train_sequences()} train and {data.n_val_sequences()} val windows "
        f"of {seq_len} tokens, vocab {data.vocab_size}",
    )
    return data


def _windows(flat: np.ndarray, seq_len: int) -> np.ndarray:
    """(n, seq_len + 1) read-only view of a flat stream, consecutive windows sharing one token."""
    n, step = (len(flat) - 1) // seq_len, flat.strides[0]
    return np.lib.stride_tricks.as_strided(flat, (n, seq_len + 1), (seq_len * step, step), writeable=False)


def load_packed(path: str | Path) -> PackedData:
    """Open a prepared cache directory (memory-mapped; nothing is read until it is indexed)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    train, val = (np.load(path / f"{name}.npy", mmap_mode="r") for name in ("train", "val"))
    seq_len = meta["seq_len"]
    return PackedData(
        train=_windows(train, seq_len),
        val=_windows(val, seq_len),
        seq_len=seq_len,
        vocab_size=meta["vocab_size"],
        eot_id=meta["eot_id"],
        fingerprint=meta["fingerprint"],
        path=path,
        meta=meta,
    )


def random_token_data(
    vocab_size: int, seq_len: int, n_seq: int, seed: int = 0, *, n_val_seq: int | None = None
) -> PackedData:
    """Uniform random tokens in memory (for benchmarks): n_seq training windows, n_val_seq validation
    windows (default max(1, n_seq // 100)); the eot id is nominal (vocab_size - 1)."""
    n_val = n_val_seq if n_val_seq is not None else max(1, n_seq // 100)
    if min(vocab_size - 1, seq_len, n_seq, n_val) < 1:
        raise ValueError(
            f"random_token_data needs vocab_size >= 2 and positive sizes, got "
            f"{vocab_size=}, {seq_len=}, {n_seq=}, {n_val=}"
        )
    rng, dtype = np.random.default_rng(seed), token_dtype(vocab_size)
    train = rng.integers(0, vocab_size, size=n_seq * seq_len + 1, dtype=dtype)
    val = rng.integers(0, vocab_size, size=n_val * seq_len + 1, dtype=dtype)
    key = digest({"random": vocab_size, "seq_len": seq_len, "n_seq": n_seq, "n_val": n_val, "seed": seed})
    meta = {"tokenizer": f"random:{vocab_size}", "seq_len": seq_len}
    return PackedData(
        train=_windows(train, seq_len),
        val=_windows(val, seq_len),
        seq_len=seq_len,
        vocab_size=vocab_size,
        eot_id=vocab_size - 1,
        fingerprint=key,
        meta=meta,
    )


# ----------------------------------------------------------------------------- batches


def _to_device(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1], dtype=np.int64))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:], dtype=np.int64))  # (B, T)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def train_batches(
    data: PackedData, batch_size: int, *, seed: int, device: str | torch.device = "cpu", start_batch: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) int64 batches of shape (batch_size, seq_len), y = x shifted by one.

    The order is a chain of random permutations of the training windows drawn from a torch.Generator
    seeded with `seed` alone (not the global RNG): every window is seen once per epoch, and every run
    with the same data and seed sees the same batches in the same order. `start_batch` resumes that
    same sequence at batch number `start_batch` (after a checkpoint) without reading the skipped data.
    """
    import torch

    if batch_size < 1 or start_batch < 0:
        raise ValueError(f"need batch_size >= 1 and start_batch >= 0, got {batch_size!r}, {start_batch!r}")
    device, n = torch.device(device), data.n_train_sequences()
    generator = torch.Generator().manual_seed(seed)
    skip = start_batch * batch_size
    for _ in range(skip // n):  # whole epochs: draw their permutations only to advance the generator
        torch.randperm(n, generator=generator)
    pending = torch.randperm(n, generator=generator)[skip % n :]
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        index, pending = pending[:batch_size].numpy(), pending[batch_size:]
        yield _to_device(data.train[index], device)


def val_batches(
    data: PackedData, batch_size: int, *, device: str | torch.device = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole validation set once, in a fixed order; the last batch may be smaller."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device)
    for start in range(0, data.n_val_sequences(), batch_size):
        yield _to_device(data.val[start : start + batch_size], device)


def decode(data: PackedData, ids: Iterable[int]) -> str:
    """Token ids of `data` back to text (for samples in logs); MQAR and random ids as numbers."""
    ids = [int(i) for i in ids]
    if data.path is not None and (data.path / "tokenizer.json").exists():
        return _tokenizer_file(str(data.path / "tokenizer.json")).decode(ids, skip_special_tokens=False)
    if data.meta.get("tokenizer") == "bytes":
        pieces = [EOT_TEXT.encode() if i == data.eot_id else bytes([i]) for i in ids]
        return b"".join(pieces).decode("utf-8", errors="replace")
    return " ".join(map(str, ids))


@lru_cache(maxsize=8)
def _tokenizer_file(path: str) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(path)
