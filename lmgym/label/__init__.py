"""``lmgym label``: a local web page where people rank K completions per prompt, feeding the reward model.

- :mod:`lmgym.label.items`: the items to rank, from a candidates JSONL or sampled from a model;
- :mod:`lmgym.label.store`: the rankings JSONL (the format ``lmgym reward-model train`` reads),
  appended crash-safely with at most one record per item;
- :mod:`lmgym.label.queue`: which item each browser tab gets next;
- :mod:`lmgym.label.server`: the Starlette app and uvicorn runner (the ``label`` extra);
- ``page.html``: the page itself, one file of HTML and plain JavaScript.

Only the server needs the extra (``pip install 'lmgym[label]'``); the rest imports without it.
"""

from lmgym.label.items import LabelItem, item_id, read_candidates, read_prompts, sample_candidates
from lmgym.label.queue import AlreadyRanked, LabelQueue, UnknownItem
from lmgym.label.store import RankingStore, check_tiers, ranking_record

__all__ = ["LabelItem", "item_id", "read_candidates", "read_prompts", "sample_candidates", "RankingStore",
           "ranking_record", "check_tiers", "LabelQueue", "AlreadyRanked", "UnknownItem"]
