"""Texts that occur in two splits: counted for every dataset, dropped from the evaluation splits on request.

Two texts are the same when they are equal after normalising: Unicode NFKC, case folded, runs of
whitespace collapsed to one space, ends stripped. An evaluation row whose text is also a training row
measures memory, not generalisation; a test row also in validation was, in effect, seen while choosing
settings. Counted per pair of loaded splits (``validation_in_train``, ``test_in_train``,
``test_in_validation``: rows of the first split whose text occurs in the second), recorded in
``result.json`` and warned about in one line. With ``dataset_options.drop_eval_duplicates`` they are
dropped: validation rows found in train, test rows found in train or validation (train is never
touched, so training is the same either way).

Carved splits keep exact copies together already (:func:`fimlora.data.registry.carve_splits`); what
remains there are near-copies (case, spacing), and a user's own split files may share anything.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import unicodedata

from fimlora.data.registry import SealedSplits, TaskData
from fimlora.errors import FimloraError

logger = logging.getLogger(__name__)

#: (evaluation split, earlier split it is compared with), in the order they are reported.
PAIRS = (("validation", "train"), ("test", "train"), ("test", "validation"))
_SPACES = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """The form two texts are compared in (see the module docstring)."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def with_duplicates(data: TaskData, *, drop: bool = False) -> TaskData:
    """``data`` with :attr:`TaskData.duplicates` counted, evaluation rows seen in an earlier split dropped
    when ``drop`` (:attr:`TaskData.dropped_duplicates`), and one warning line when any were found."""
    splits = data.splits
    present = [s for s in ("train", "validation", "test") if s in splits]
    texts = {s: [normalise_text(t) for t in splits[s]["text"][:]] for s in present}
    seen = {s: set(texts[s]) for s in present}
    counts = {
        f"{split}_in_{earlier}": sum(t in seen[earlier] for t in texts[split])
        for split, earlier in PAIRS
        if split in texts and earlier in texts
    }
    dropped: dict[str, int] | None = None
    if drop:
        dropped = {}
        kept_splits = dict(splits)
        for split in ("validation", "test"):
            if split not in texts:
                continue
            earlier = [seen[s] for s in present[: present.index(split)]]
            keep = [i for i, t in enumerate(texts[split]) if not any(t in e for e in earlier)]
            dropped[split] = len(texts[split]) - len(keep)
            if not keep:
                raise FimloraError(
                    f"Every {split} row of {data.name!r} also occurs in an earlier split, so dropping "
                    "duplicates (dataset_options.drop_eval_duplicates) leaves it empty; give it other rows."
                )
            if dropped[split]:
                kept_splits[split] = splits[split].select(keep)
        splits = SealedSplits(kept_splits, data.sealed) if data.sealed else type(splits)(kept_splits)
    message = duplicates_warning(data.name, counts, {s: len(texts[s]) for s in present}, dropped)
    if message:
        logger.warning(message)
    return dataclasses.replace(data, splits=splits, duplicates=counts, dropped_duplicates=dropped)


def duplicates_warning(
    name: str, counts: dict[str, int], sizes: dict[str, int], dropped: dict[str, int] | None
) -> str | None:
    """The one warning line about ``counts`` (None when there are none)."""
    found = [
        f"{n} of {sizes[key.split('_in_')[0]]:,} {key.split('_in_')[0]} rows also occur in "
        f"{key.split('_in_')[1]}"
        for key, n in counts.items()
        if n
    ]
    if not found:
        return None
    text = f"warning: dataset {name!r}: {'; '.join(found)} (same text after normalising case and spaces); "
    if dropped is not None:
        gone = ", ".join(f"{n} {split}" for split, n in dropped.items() if n)
        return text + f"dropped from the evaluation splits: {gone} row(s)."
    return text + "dataset_options.drop_eval_duplicates: true drops them from the evaluation splits."
