"""Where a trial's tokens come from and how they are cut: `DataConfig`, validated on construction, and the
fingerprint of the arrays it names. Free of `datasets`, `tokenizers` and torch, so that checking a study
(`ablate validate`, `ablate plan`) loads none of them; `ablate.data` builds and serves the arrays.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ablate import corpora, packaged

DATA_VERSION = 1  # bump when packing or tokenisation changes the arrays (part of the fingerprint)
EOT_TEXT = "<|endoftext|>"
EOT_CANDIDATES = (EOT_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TXT_SAMPLE_BY = ("line", "paragraph", "document")
GENERATED = ("stories", "mqar")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the tokens come from and how they are cut. Validated on construction."""

    source: str = "stories"  # see the docstring of ablate.data
    text_field: str = "text"
    train_split: str = "train"
    val_split: str = "validation"  # missing from a dataset: val_fraction of train is carved off
    val_fraction: float = 0.01
    tokenizer: str = "bpe:4096"  # "bpe:<vocab>" (trained on the train split) | "hf:<name or file>" | "bytes"
    revision: str | None = None  # hub dataset: a commit hash, tag or branch to pin; None: the latest
    tokenizer_revision: str | None = None  # hub tokenizer: the same
    corpus_seed: int = 0  # generated corpora; also seeds the carve of a missing validation split
    corpus_docs: int = 20000  # generated corpora: training documents (random: training sequences)
    max_train_tokens: int | None = None  # truncate the training stream to this many target tokens
    val_tokens: int = 65536  # size of the fixed validation set, in target tokens
    cache_dir: str | None = None  # default: $ABLATE_CACHE or ~/.cache/ablate
    txt_sample_by: str = "paragraph"  # .txt documents: "line", "paragraph" (blank-line separated), "document"
    mqar_pairs: int = 16  # mqar: key-value bindings per sequence
    mqar_vocab: int = 512  # mqar: token ids (0 = eot, then keys, then values)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_values(self)
        source_kind(self.source)
        tokenizer_kind(self.tokenizer)


# ----------------------------------------------------------------------------- config validation


def bad_value(name: str, value: object, fix: str) -> ValueError:
    return ValueError(f"DataConfig.{name}={value!r}: {fix}")


def _check_types(cfg: DataConfig) -> None:
    for f in dataclasses.fields(cfg):
        value, optional = getattr(cfg, f.name), "None" in str(f.type)
        expected = str(f.type).split(" |")[0]
        if value is None and optional:
            continue
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
        }[expected]
        if not ok:
            raise bad_value(f.name, value, f"expected {f.type}, got {type(value).__name__}")


def _check_values(cfg: DataConfig) -> None:
    for name in ("text_field", "train_split", "val_split"):
        if not getattr(cfg, name):
            raise bad_value(name, getattr(cfg, name), "must be a non-empty name")
    if cfg.train_split == cfg.val_split:
        raise bad_value("val_split", cfg.val_split, "must differ from train_split")
    if not 0.0 < cfg.val_fraction <= 0.5:
        raise bad_value("val_fraction", cfg.val_fraction, "must be in (0, 0.5], e.g. 0.01")
    for name in ("corpus_docs", "val_tokens", "mqar_pairs"):
        if getattr(cfg, name) < 1:
            raise bad_value(name, getattr(cfg, name), "must be a positive integer")
    if cfg.corpus_seed < 0:
        raise bad_value("corpus_seed", cfg.corpus_seed, "must be >= 0")
    if cfg.max_train_tokens is not None and cfg.max_train_tokens < 1:
        raise bad_value(
            "max_train_tokens", cfg.max_train_tokens, "must be a positive integer, or None for all"
        )
    if cfg.txt_sample_by not in TXT_SAMPLE_BY:
        raise bad_value("txt_sample_by", cfg.txt_sample_by, f"choose one of {', '.join(TXT_SAMPLE_BY)}")
    if not 2 * cfg.mqar_pairs + 1 <= cfg.mqar_vocab <= 65535:
        raise bad_value(
            "mqar_vocab",
            cfg.mqar_vocab,
            f"must be in [2*mqar_pairs+1, 65535] = [{2 * cfg.mqar_pairs + 1}, 65535]",
        )


def source_kind(source: str) -> str:
    """'stories' | 'mqar' | 'hf' | 'pkg' | 'random' | 'local' for a source string; ValueError if not usable."""
    if source in GENERATED:
        return source
    scheme, sep, rest = source.partition(":")
    if sep and scheme == "pkg":
        packaged.parts(source)
        return "pkg"
    if sep and scheme == "hf":
        if not rest.split(":")[0]:
            raise bad_value("source", source, "name the dataset, e.g. hf:roneneldan/TinyStories")
        return "hf"
    if sep and scheme == "random":
        if not rest.isdigit() or not 2 <= int(rest) <= 2**32 - 1:
            raise bad_value(
                "source", source, "random:<vocab> needs a vocabulary size >= 2, e.g. random:50257"
            )
        return "random"
    if sep and len(scheme) > 1 and not Path(source).exists():
        choices = (
            "stories, mqar, hf:<dataset>, pkg:<corpus>, random:<vocab>, or a path/glob to "
            ".txt/.json/.jsonl/.parquet"
        )
        raise bad_value("source", source, f"unknown source scheme {scheme + ':'!r}; use one of {choices}")
    local_files(source)
    return "local"


def local_files(source: str) -> list[Path]:
    """The data files a local path, directory or glob names (sorted); ValueError when there are none."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = [p for p in sorted(path.rglob("*")) if p.suffix in FILE_BUILDERS and p.is_file()]
    else:
        found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
    if not found:
        raise bad_value(
            "source",
            source,
            "no such file, directory or glob match (or a typo in a source name: "
            "use stories, mqar, hf:<dataset>, pkg:<corpus>, random:<vocab>)",
        )
    unknown = sorted({p.suffix for p in found} - set(FILE_BUILDERS))
    if unknown:
        raise bad_value("source", source, f"unsupported file types {unknown}; use {', '.join(FILE_BUILDERS)}")
    if len({FILE_BUILDERS[p.suffix] for p in found}) > 1:
        raise bad_value("source", source, "mixes text, JSON and Parquet files; point it at one kind")
    return found


def tokenizer_kind(spec: str) -> tuple[str, str]:
    """('bytes', '') | ('bpe', '<vocab>') | ('hf', '<name or file>'); ValueError naming the choices."""
    kind, _, arg = spec.partition(":")
    if spec == "bytes":
        return "bytes", ""
    if kind == "bpe":
        if not arg.isdigit() or not 257 <= int(arg) <= 2**20:
            raise bad_value(
                "tokenizer",
                spec,
                "bpe:<vocab> needs 257 <= vocab <= 1048576 (256 bytes + eot), e.g. bpe:4096",
            )
        return "bpe", arg
    if kind == "hf" and arg:
        return "hf", arg
    raise bad_value(
        "tokenizer",
        spec,
        "use bpe:<vocab> (e.g. bpe:4096), hf:<name> (e.g. hf:EleutherAI/gpt-neo-125M) or bytes",
    )


# ----------------------------------------------------------------------------- fingerprints


def digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def corpus_identity(cfg: DataConfig) -> dict:
    kind = source_kind(cfg.source)
    if kind == "stories":
        return {
            "source": "stories",
            "version": corpora.STORIES_VERSION,
            "seed": cfg.corpus_seed,
            "docs": cfg.corpus_docs,
        }
    if kind == "mqar":
        return {
            "source": "mqar",
            "version": corpora.MQAR_VERSION,
            "seed": cfg.corpus_seed,
            "docs": cfg.corpus_docs,
            "pairs": cfg.mqar_pairs,
            "vocab": cfg.mqar_vocab,
        }
    if kind == "pkg":
        return packaged.identity(cfg.source) | {"carve": [cfg.val_fraction, cfg.corpus_seed]}
    ident = {
        "source": cfg.source,
        "field": cfg.text_field,
        "splits": [cfg.train_split, cfg.val_split],
        "carve": [cfg.val_fraction, cfg.corpus_seed],
    }
    if kind == "local":
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in local_files(cfg.source)]
        ident |= {"files": stats, "txt_sample_by": cfg.txt_sample_by}
    if kind == "hf" and cfg.revision:
        ident["revision"] = cfg.revision
    return ident


def tokenizer_identity(cfg: DataConfig) -> dict:
    if source_kind(cfg.source) == "mqar":
        return {"tokenizer": "mqar-native"}
    kind, arg = tokenizer_kind(cfg.tokenizer)
    if kind == "bpe":
        return {"tokenizer": cfg.tokenizer, "trained_on": corpus_identity(cfg)}
    if kind == "hf" and Path(arg).is_file():
        return {"tokenizer": "file", "sha256": hashlib.sha256(Path(arg).read_bytes()).hexdigest()}
    pinned = {"tokenizer_revision": cfg.tokenizer_revision} if kind == "hf" and cfg.tokenizer_revision else {}
    return {"tokenizer": cfg.tokenizer, **pinned}


def fingerprint(cfg: DataConfig, seq_len: int) -> str:
    """The cache key of (cfg, seq_len): equal exactly when prepare() would produce the same arrays."""
    payload = {
        "version": DATA_VERSION,
        "corpus": corpus_identity(cfg),
        **tokenizer_identity(cfg),
        "seq_len": seq_len,
        "max_train_tokens": cfg.max_train_tokens,
        "val_tokens": cfg.val_tokens,
    }
    return digest(payload)


def cache_root(cfg: DataConfig) -> Path:
    """Where prepared data lives: cfg.cache_dir, else $ABLATE_CACHE, else ~/.cache/ablate."""
    return Path(cfg.cache_dir or os.environ.get("ABLATE_CACHE") or "~/.cache/ablate").expanduser()
