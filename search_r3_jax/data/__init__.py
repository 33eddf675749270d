"""Data: TFDS builders (array_record, no TensorFlow needed) and the loader.

from search_r3_jax import data
builder = data.wiki_fanout_builder()        # or beir_builder(path), ...
loader = data.Loader.from_builder(builder, "train", batch_size=32)
for batch in loader: ...                     # a dict of lists
state = loader.get_state()                   # JSON-able; set_state resumes
"""

from search_r3_jax.data.beir import beir_builder
from search_r3_jax.data.beir import BeirFolder
from search_r3_jax.data.bm25 import BM25
from search_r3_jax.data.common import DATA_DIR_ENV
from search_r3_jax.data.common import DataError
from search_r3_jax.data.common import split_fields
from search_r3_jax.data.loader import Loader
from search_r3_jax.data.triples import Triples
from search_r3_jax.data.triples import triples_builder
from search_r3_jax.data.wiki_fanout import wiki_fanout_builder
from search_r3_jax.data.wiki_fanout import WikiFanout

__all__ = [
    "BM25",
    "BeirFolder",
    "DATA_DIR_ENV",
    "DataError",
    "Loader",
    "Triples",
    "WikiFanout",
    "beir_builder",
    "split_fields",
    "triples_builder",
    "wiki_fanout_builder",
]
