"""Shared prompt prefixes computed once (issue 16): a small cache of prefix KV states.

The logprobs critic sends many one-token requests whose prompts begin alike: the chat template's
system turn and the judge's instructions for every request, the question for every aspect
selection of one query, the question and the answer for every verdict on one answer; and a
level's answers share the candidate system prompt and the in-context examples. A cold prefill
recomputes those tokens for every request. Here the keys and values of such prefixes are kept,
keyed by their token ids, and a pass computes only what follows them: a scoring pass reads the
last logits (:func:`last_logits`), the continuous engine's prefill also keeps the keys and values
to decode from (:func:`prefill`).

How a pass works (:func:`prefill`), for a batch of prompts:

1. each prompt looks up the stored prefix that shares the most leading tokens with it (any
   stored sequence serves every prompt that starts like it: a causal model's keys and values at a
   position depend only on the tokens up to it, so the first ``m`` positions of an entry are the
   prefix of length ``m``);
2. prompts of the batch that share a longer prefix among themselves than they found stored get
   that prefix computed once, as a row of its own (itself extending its best stored match), and
   stored: later verdicts on the same answer, or selections for the same query, find it;
3. every prompt then runs only its suffix against its prefix, in one forward pass.

Layout of a pass: a ``DynamicCache`` (built with its public ``ddp_cache_data`` constructor) holds
each row's prefix left-padded to the longest prefix of the batch; the suffixes follow, also
left-padded, so the last position of the input is each row's last prompt token and
``logits_to_keep=1`` gives exactly the logits a cold prefill reads. The 2D attention mask marks
each row's real prefix and suffix tokens (a hole of padding between them is allowed:
transformers' mask takes causality from the cache length and validity from this mask), and
``position_ids`` continue each row's prefix (``m, m+1, ...``), so rotary positions are those of
a cold prefill. Only the public pieces of transformers are used: ``DynamicCache``, its
``layers[i].keys / .values`` and the model's ``forward``.

Bounded and measured: entries are evicted least recently used first once their keys and values
exceed ``budget_bytes``; :class:`PrefixCacheStats` counts lookups, hits, tokens computed and
tokens saved. Everything here runs under the model's lock (the caller's), so it takes no lock
of its own.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

#: Default memory for stored prefixes: SmolLM2-135M keeps 46 KB of float32 keys and values per
#: token (30 layers x 3 KV heads x 64 x 2), so 96 MB hold about 2,000 prefix tokens: the judge
#: instructions and the last dozen questions and answers of a search.
DEFAULT_BUDGET_BYTES = 96 * 2**20
#: Shorter shared prefixes are not worth a stored entry or a separate row.
MIN_PREFIX_TOKENS = 16


def budget_from_env() -> int:
    """``DRPO_PREFIX_CACHE_MB`` (0 turns the cache off, for benchmarks), else the default."""
    raw = os.environ.get("DRPO_PREFIX_CACHE_MB", "").strip()
    if not raw:
        return DEFAULT_BUDGET_BYTES
    try:
        return max(0, int(float(raw) * 2**20))
    except ValueError:
        return DEFAULT_BUDGET_BYTES


@dataclass(eq=False)
class PrefixEntry:
    """The keys and values of one token sequence, per layer ``[1, heads, length, head_dim]``."""

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


@dataclass
class PrefixCacheStats:
    """What the cache did: how often it was asked and found something, and what it saved."""

    lookups: int = 0  # prompts of scoring passes that looked for a stored prefix
    hits: int = 0  # of those, how many reused one (at least MIN_PREFIX_TOKENS tokens)
    tokens_saved: int = 0  # prompt tokens not run through the model thanks to stored prefixes
    tokens_computed: int = 0  # tokens the passes did run (suffixes and new shared prefixes)
    stored: int = 0  # entries added
    evictions: int = 0  # entries dropped to stay within the budget

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)
class PrefixCache:
    """Stored prefixes of one loaded model, least recently used first, within ``budget_bytes``."""

    budget_bytes: int = field(default_factory=budget_from_env)
    min_tokens: int = MIN_PREFIX_TOKENS
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    _entries: OrderedDict[tuple[int, ...], PrefixEntry] = field(default_factory=OrderedDict)
    _bytes: int = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ids: Sequence[int]) -> bool:
        return tuple(ids) in self._entries

    def lookup(self, ids: Sequence[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the most leading tokens with ``ids`` and how many (< ``len(ids)``).

        At least one token is always left to compute: its logits are what a pass reads. A match
        shorter than ``min_tokens`` counts as none. The entry found becomes the most recent.
        """
        best, best_length = None, 0
        limit = len(ids) - 1
        for entry in self._entries.values():
            length = min(_common_length(entry.ids, ids), limit)
            if length > best_length:
                best, best_length = entry, length
        if best is None or best_length < self.min_tokens:
            return None, 0
        self._entries.move_to_end(best.ids)
        return best, best_length

    def store(self, entry: PrefixEntry) -> bool:
        """Keep ``entry`` (most recent), evicting the least recently used beyond the budget."""
        if not self.enabled or entry.nbytes > self.budget_bytes or entry.ids in self._entries:
            return False
        self._entries[entry.ids] = entry
        self._bytes += entry.nbytes
        self.stats.stored += 1
        while self._bytes > self.budget_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.nbytes
            self.stats.evictions += 1
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    shared = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared += 1
    return shared


@dataclass(frozen=True)
class _Item:
    """One row of a pass: a stored prefix (or none) and the tokens after it."""

    entry: PrefixEntry | None
    reused: int  # how many leading tokens of the prompt come from ``entry``
    suffix: list[int]


@dataclass(frozen=True)
class Prefill:
    """One prefill pass: each prompt's last-position logits, and the pass's keys and values.

    ``kv`` holds every row's prefix and suffix (``[rows, heads, length, head_dim]`` per layer)
    and ``mask`` (``[rows, length]``) is 1 over each row's real tokens, 0 over its padding
    (left of its prefix, and between its prefix and its suffix): what a decode step that goes on
    from this pass needs, with each row's next position ``len(prompt)``.
    """

    logits: torch.Tensor
    kv: DynamicCache
    mask: torch.Tensor


def last_logits(
    model: Any, pad_id: int, prompts: Sequence[Sequence[int]], cache: PrefixCache
) -> torch.Tensor:
    """The logits (float32, ``[len(prompts), vocab]``) at each prompt's last position.

    The same numbers as a cold prefill of each prompt, up to float noise, computing only what
    ``cache`` does not hold (see the module docstring for the three steps). With the cache off,
    one plain pass.
    """
    return prefill(model, pad_id, prompts, cache).logits


def prefill(
    model: Any, pad_id: int, prompts: Sequence[Sequence[int]], cache: PrefixCache
) -> Prefill:
    """Prefill ``prompts`` reusing ``cache``'s prefixes: logits, keys and values, mask.

    Shared by the scoring lane (which reads only the logits) and the continuous engine (which
    goes on decoding from the keys and values): both reuse the same stored prefixes, and a
    level's answers, which share the system prompt and the in-context examples, store theirs for
    the answers that join later.
    """
    if not cache.enabled or not prefix_reuse_supported(model):
        items = [_Item(None, 0, list(ids)) for ids in prompts]
        cache.stats.tokens_computed += sum(len(ids) for ids in prompts)
        return _forward(model, pad_id, items)
    found = [cache.lookup(ids) for ids in prompts]
    shared = _shared_prefixes(prompts, [reused for _, reused in found], cache.min_tokens)
    if shared:
        prefix_items = [_item(cache, ids) for ids in shared]
        done = _forward(model, pad_id, prefix_items)
        cache.stats.tokens_computed += sum(len(item.suffix) for item in prefix_items)
        for entry in _entries(prefix_items, done):
            cache.store(entry)
    items = [_item(cache, ids) for ids in prompts]
    cache.stats.lookups += len(items)
    for item in items:
        if item.entry is not None:
            cache.stats.hits += 1
            cache.stats.tokens_saved += item.reused
        cache.stats.tokens_computed += len(item.suffix)
    return _forward(model, pad_id, items)


def prefix_reuse_supported(model: Any) -> bool:
    """True for models whose every layer attends to the whole past (no sliding window, no
    linear attention): only there are a prefix's keys and values all its continuations need.
    """
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    if get_text_config is not None:
        config = get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        return False
    return not (
        getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    )


def _item(cache: PrefixCache, ids: Sequence[int]) -> _Item:
    entry, reused = cache.lookup(ids)
    return _Item(entry, reused, list(ids[reused:]))


def _shared_prefixes(
    prompts: Sequence[Sequence[int]], reused: Sequence[int], min_gain: int
) -> list[tuple[int, ...]]:
    """Prefixes that two or more prompts share beyond what they found stored, worth computing once.

    For each prompt, its longest common prefix with any other prompt of the batch (found between
    neighbours in sorted order), kept when it is at least ``min_gain`` tokens longer than the
    prompt's stored match. A prefix contained in a longer kept one is dropped: the longer entry
    serves it.
    """
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    longest = [0] * len(prompts)
    for a, b in itertools.pairwise(order):
        length = _common_length(prompts[a], prompts[b])
        longest[a] = max(longest[a], length)
        longest[b] = max(longest[b], length)
    wanted: set[tuple[int, ...]] = set()
    for i, ids in enumerate(prompts):
        length = min(longest[i], len(ids) - 1)
        if length >= reused[i] + min_gain:
            wanted.add(tuple(ids[:length]))
    kept = sorted(wanted, key=len, reverse=True)
    return [
        ids
        for n, ids in enumerate(kept)
        if not any(longer[: len(ids)] == ids for longer in kept[:n] if len(longer) > len(ids))
    ]


def _cache_keyword(model: Any) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.25), else the old one.

    Read from the model's class, so a wrapper set on one instance's ``forward`` does not hide it,
    and once per class: every scoring pass and engine prefill asks.
    """
    return _cache_keyword_of(type(model))


@functools.cache
def _cache_keyword_of(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _forward(model: Any, pad_id: int, items: Sequence[_Item]) -> Prefill:
    """One forward pass of ``items``: last-position logits, the pass's keys, values and mask."""
    device = model.device
    widest_prefix = max(item.reused for item in items)
    width = max(len(item.suffix) for item in items)
    input_ids = torch.tensor(
        [[pad_id] * (width - len(item.suffix)) + item.suffix for item in items],
        dtype=torch.long,
        device=device,
    )
    mask_rows, position_rows = [], []
    for item in items:
        pad_prefix, pad_suffix = widest_prefix - item.reused, width - len(item.suffix)
        mask_rows.append(
            [0] * pad_prefix + [1] * item.reused + [0] * pad_suffix + [1] * len(item.suffix)
        )
        position_rows.append(
            [0] * pad_suffix + list(range(item.reused, item.reused + len(item.suffix)))
        )
    attention_mask = torch.tensor(mask_rows, dtype=torch.long, device=device)
    position_ids = torch.tensor(position_rows, dtype=torch.long, device=device)
    kv = (
        DynamicCache(ddp_cache_data=_batched_prefixes(items, widest_prefix))
        if widest_prefix
        else DynamicCache()
    )
    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{_cache_keyword(model): kv},
        )
        logits = out.logits[:, -1, :].float()
    return Prefill(logits, kv, attention_mask)


def _entries(items: Sequence[_Item], done: Prefill) -> list[PrefixEntry]:
    """Each row of a pass as a stored entry: its prefix and suffix keys and values, unpadded."""
    widest_prefix = max(item.reused for item in items)
    length = done.mask.shape[1]
    entries = []
    for row, item in enumerate(items):
        start = widest_prefix - item.reused
        suffix_start = length - len(item.suffix)
        layers = tuple(
            (
                torch.cat(
                    [k[row : row + 1, :, start:widest_prefix], k[row : row + 1, :, suffix_start:]],
                    dim=2,
                ).clone(),
                torch.cat(
                    [v[row : row + 1, :, start:widest_prefix], v[row : row + 1, :, suffix_start:]],
                    dim=2,
                ).clone(),
            )
            for k, v in ((layer.keys, layer.values) for layer in done.kv.layers)
        )
        prefix = item.entry.ids[: item.reused] if item.entry is not None else ()
        entries.append(PrefixEntry(ids=(*prefix, *item.suffix), layers=layers))
    return entries


def _batched_prefixes(
    items: Sequence[_Item], width: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, every row's stored prefix left-padded (zeros, masked out) to ``width``."""
    template = next(item.entry for item in items if item.entry is not None)
    layers = []
    for layer, (k0, v0) in enumerate(template.layers):
        shape = (len(items), k0.shape[1], width, k0.shape[3])
        keys = k0.new_zeros(shape)
        values = v0.new_zeros((len(items), v0.shape[1], width, v0.shape[3]))
        for row, item in enumerate(items):
            if item.entry is not None and item.reused:
                k, v = item.entry.layers[layer]
                keys[row, :, width - item.reused :] = k[0, :, : item.reused]
                values[row, :, width - item.reused :] = v[0, :, : item.reused]
        layers.append((keys, values))
    return layers
