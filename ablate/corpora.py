"""Generated corpora that need no network.

`stories`: short children's stories from a seed. A hero, a friend and a treasured object are introduced in
the opening lines, a variable stretch of filler follows, and the ending refers back to them by name, so
predicting the ending needs context from hundreds of tokens earlier. The vocabulary is a few hundred words,
small enough for a tiny model to learn the grammar and spend its capacity on the references.

`mqar`: multi-query associative recall. A sequence binds keys to values (k1 v1 k2 v2 ...), then asks for
bound keys again (k v k v ...): every value in the query part is determined by the binding earlier on.
MQAR sequences are token ids (no tokenizer): 0 is end-of-text, keys and values take disjoint id ranges.

Every document is generated from (seed, split, index) alone, so any slice of a corpus can be produced
independently, and the validation split comes from a different seed stream than the training split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np

STORIES_VERSION = 1  # bump when the generator's output changes (it is part of the cache fingerprint)
MQAR_VERSION = 1

GIRL_NAMES = ["Lily", "Mia", "Sara", "Anna", "Emma", "Zoe", "Lucy", "Ella", "Ruby", "Amy", "Daisy", "Luna"]
BOY_NAMES = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Tim", "Finn", "Noah", "Jake", "Rex", "Milo"]
KINDS = ["girl", "boy", "dog", "cat", "bird", "rabbit", "bear", "fox", "frog", "duck", "mouse", "puppy"]
TRAITS = ["little", "happy", "kind", "brave", "shy", "curious", "funny", "clever", "gentle", "sleepy"]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "black", "brown", "gold"]
SIZES = ["big", "small", "shiny", "old", "new", "soft", "tiny", "round"]
OBJECTS = ["ball", "kite", "hat", "box", "book", "key", "boat", "doll", "car", "drum", "cup", "ring", "map",
           "shell", "stone", "flower", "bell", "blanket", "train", "coin", "lamp", "balloon", "sock", "spoon",
           "basket", "rope", "star", "bucket", "scarf", "whistle"]  # fmt: skip
PLACES = ["park", "forest", "garden", "beach", "lake", "hill", "farm", "river", "town", "school", "market",
          "cave", "meadow", "pond", "zoo", "playground"]  # fmt: skip
HIDING = ["a bush", "a big rock", "the bed", "a tree", "a pile of leaves", "the table", "a log", "the sand"]
HOLES = ["the pond", "a deep hole", "the tall grass", "a bush", "the river", "a pile of leaves", "the mud"]
SHADE = ["a tree", "a big rock", "an old bridge", "a tall flower"]
SKIES = ["blue", "gray", "pink", "orange", "clear"]
CREATURES = ["a bird", "a squirrel", "a bee", "a butterfly", "a snail", "an owl", "a goat", "a fish", "a cow"]
ACTIONS = ["singing", "flying", "eating", "sleeping", "jumping", "playing", "hiding", "dancing", "running"]
GAMES = ["play tag", "run and jump", "sing a song", "build a tower", "look for bugs", "play hide and seek",
         "draw pictures", "have a picnic", "count the clouds", "climb a tree"]  # fmt: skip
WEATHER = ["warm", "bright", "hot", "cool", "windy", "gray", "cloudy"]
FEELINGS = ["happy", "glad", "proud", "excited", "calm"]
SAD = ["sad", "worried", "upset", "scared"]


@dataclass(frozen=True)
class Story:
    """One generated story and the entities it introduces early and refers to again at the end."""

    text: str
    hero: str
    friend: str
    item: str  # e.g. "red ball"


@dataclass(frozen=True)
class _Char:
    name: str
    kind: str
    he: str
    his: str
    him: str


def _character(rng: random.Random, avoid: str = "") -> _Char:
    girl = rng.random() < 0.5
    name = rng.choice([n for n in (GIRL_NAMES if girl else BOY_NAMES) if n != avoid])
    kinds = [k for k in KINDS if k != ("boy" if girl else "girl")]
    return _Char(name, rng.choice(kinds), *(("she", "her", "her") if girl else ("he", "his", "him")))


def _cap(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _opening(rng: random.Random, h: _Char, f: _Char, item: str, gift: str | None, place: str) -> list[str]:
    hero = rng.choice([
        f"Once upon a time, there was a {rng.choice(TRAITS)} {h.kind} named {h.name}.",
        f"There once was a {rng.choice(TRAITS)} {h.kind} called {h.name}.",
        f"{h.name} was a {rng.choice(TRAITS)} {h.kind} who lived near the {place}.",
    ])  # fmt: skip
    owns = rng.choice([
        f"{_cap(h.he)} had a {item} that {h.he} loved very much.",
        f"{h.name}'s favorite thing in the world was a {item}.",
        f"Every day, {h.name} played with {h.his} {item}.",
    ])  # fmt: skip
    friend = rng.choice([
        f"{h.name} had a friend, a {rng.choice(TRAITS)} {f.kind} named {f.name}.",
        f"{f.name} the {f.kind} was {h.name}'s best friend.",
        f"Next door lived a {f.kind} called {f.name}.",
    ])  # fmt: skip
    lines = [hero, owns, friend] + ([f"{f.name} always carried a {gift}."] if gift else [])
    when = rng.choice(["One day", "One morning", "One sunny afternoon", f"On a {rng.choice(WEATHER)} day"])
    return [*lines, f"{when}, {h.name} and {f.name} went to the {place}."]


def _filler(rng: random.Random, h: _Char, f: _Char, place: str) -> str:
    who = rng.choice([h, f])
    return rng.choice([
        f"The sun was {rng.choice(WEATHER)} and the sky was {rng.choice(SKIES)}.",
        f"They saw {rng.choice(CREATURES)} {rng.choice(ACTIONS)} by a tree.",
        f"{who.name} wanted to {rng.choice(GAMES)}.",
        f"So they decided to {rng.choice(GAMES)}.",
        f"{_cap(who.he)} felt {rng.choice(FEELINGS)} to be at the {place}.",
        f"{who.name} found a {rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(OBJECTS)} on the ground.",
        f"\"Look at that!\" said {who.name}, and pointed at {rng.choice(CREATURES)}.",
        "They laughed and played for a long time.",
        f"A {rng.choice(['soft', 'cold', 'strong'])} wind blew through the {place}.",
        f"{who.name} sat down to rest under {rng.choice(SHADE)}.",
        f"\"Let us {rng.choice(GAMES)}!\" said {who.name}.",
    ])  # fmt: skip


def _trouble(rng: random.Random, h: _Char, item: str) -> list[str]:
    lost = rng.choice([
        f"Suddenly, {h.name} could not find {h.his} {item}.",
        f"Oh no! The {item} fell into {rng.choice(HOLES)} and was gone.",
        f"Then {rng.choice(CREATURES)} took the {item} and ran away.",
    ])  # fmt: skip
    return [lost, f"{h.name} was {rng.choice(SAD)}. {_cap(h.he)} looked everywhere."]


def _ending(rng: random.Random, h: _Char, f: _Char, item: str, gift: str | None) -> list[str]:
    found = rng.choice([
        f"{f.name} looked behind {rng.choice(HIDING)} and found the {item}.",
        f"Then {f.name} had an idea and helped {h.name} get the {item} back.",
        f"At last, {f.name} saw the {item} and gave it to {h.name}.",
    ])  # fmt: skip
    thanks = rng.choice([f'"Thank you, {f.name}!" said {h.name}.', f"{h.name} hugged {f.name}."])
    close = rng.choice([
        f"From that day on, {h.name} always kept {h.his} {item} safe.",
        f"{h.name} and {f.name} were the best of friends.",
        f"That night, {h.name} went to sleep with the {item} next to {h.him}.",
    ] + ([f"{f.name} gave {h.name} the {gift} too, and they both smiled."] if gift else []))  # fmt: skip
    return [found, thanks, close]


def make_story(rng: random.Random) -> Story:
    """One story drawn from `rng` (a `random.Random`)."""
    hero = _character(rng)
    friend = _character(rng, avoid=hero.name)
    item = f"{rng.choice(COLORS)} {rng.choice(OBJECTS)}"
    gift = f"{rng.choice(SIZES)} {rng.choice([o for o in OBJECTS if not item.endswith(o)])}"
    gift = gift if rng.random() < 0.6 else None
    place = rng.choice(PLACES)
    lines = _opening(rng, hero, friend, item, gift, place)
    lines += [_filler(rng, hero, friend, place) for _ in range(rng.randint(2, 7))]
    lines += _trouble(rng, hero, item)
    lines += [_filler(rng, hero, friend, place) for _ in range(rng.randint(1, 4))]
    lines += _ending(rng, hero, friend, item, gift)
    return Story(" ".join(lines), hero.name, friend.name, item)


def story(seed: int, split: str, index: int) -> Story:
    """Story number `index` of `split` for corpus seed `seed` (independent of every other story)."""
    return make_story(random.Random(f"stories:v{STORIES_VERSION}:{seed}:{split}:{index}"))


def stories(n: int, seed: int, split: str = "train", start: int = 0) -> list[str]:
    """The texts of stories `start .. start+n-1` of `split`."""
    return [story(seed, split, i).text for i in range(start, start + n)]


@dataclass(frozen=True)
class MQARSpec:
    """Layout of MQAR sequences: `pairs` key-value bindings over a vocabulary of `vocab` ids (0 = eot)."""

    pairs: int = 16
    vocab: int = 512

    @property
    def n_keys(self) -> int:
        return (self.vocab - 1) // 2

    def is_key(self, token: int) -> bool:
        return 1 <= token <= self.n_keys

    def is_value(self, token: int) -> bool:
        return self.n_keys < token < self.vocab


def mqar(spec: MQARSpec, length: int, n: int, seed: int, split: str = "train", start: int = 0) -> np.ndarray:
    """MQAR sequences `start .. start+n-1` of `split` as an (n, length) uint16 array, each ending in eot.

    Layout: k1 v1 .. kP vP, then query pairs k v with k drawn from the bound keys; when the remainder is
    odd the sequence is padded with eot before its final eot, so every sequence is exactly `length` long.
    """
    n_queries = (length - 1 - 2 * spec.pairs) // 2
    if n_queries < 1:
        raise ValueError(f"MQAR length {length} leaves no room for queries after {spec.pairs} pairs")
    out = np.zeros((n, length), dtype=np.uint16)  # 0 = eot: the padding and the final token
    for row, index in enumerate(range(start, start + n)):
        rng = np.random.default_rng([MQAR_VERSION, seed, _stream(split), index])
        keys = rng.choice(spec.n_keys, size=spec.pairs, replace=False) + 1
        values = rng.integers(spec.n_keys + 1, spec.vocab, size=spec.pairs)
        asked = rng.integers(0, spec.pairs, size=n_queries)
        out[row, 0 : 2 * spec.pairs : 2] = keys
        out[row, 1 : 2 * spec.pairs : 2] = values
        query_end = 2 * spec.pairs + 2 * n_queries
        out[row, 2 * spec.pairs : query_end : 2] = keys[asked]
        out[row, 2 * spec.pairs + 1 : query_end : 2] = values[asked]
    return out


def _stream(split: str) -> int:
    return int.from_bytes(hashlib.sha256(split.encode()).digest()[:8], "little")
