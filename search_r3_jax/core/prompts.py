"""Every prompt the model sees: query (with and without reasoning) and document.

The paper gives the stage-1 query prompt (system "Please represent user
queries.", assistant "The embedding is <|embed_token|>."); the document and
reasoning prompts are this project's defaults (see PAPER.md). All of them are
fields of `PromptConfig`, so configs can change them.
"""

from __future__ import annotations

import dataclasses

EMBED_TOKEN = "<|embed_token|>"


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Prompt texts. `embed_suffix` must contain `EMBED_TOKEN` exactly once."""

  query_system: str = "Please represent user queries."
  document_system: str = "Please represent documents."
  reasoning_system: str = (
      "Analyse the user's search query briefly: what it asks for and which "
      "facts, names or terms a relevant document would contain. Then finish "
      "with exactly: The embedding is " + EMBED_TOKEN + "."
  )
  embed_suffix: str = "The embedding is " + EMBED_TOKEN + "."

  def __post_init__(self):
    if self.embed_suffix.count(EMBED_TOKEN) != 1:
      raise ValueError(
          f"PromptConfig.embed_suffix must contain {EMBED_TOKEN} exactly once, "
          f"got {self.embed_suffix!r}"
      )

  def system(self, kind: str, reasoning: bool = False) -> str:
    if kind == "query":
      return self.reasoning_system if reasoning else self.query_system
    if kind == "document":
      return self.document_system
    raise ValueError(f"prompt kind must be 'query' or 'document', got {kind!r}")

  def messages(
      self, kind: str, text: str, reasoning: bool = False, answer: bool = True
  ) -> list[dict]:
    """Chat messages for one query or document.

    Args:
      kind: "query" or "document".
      text: the query or document text.
      reasoning: for queries, ask for an analysis before the embed token.
      answer: append the assistant turn `embed_suffix` (no-reasoning
        encoding); False leaves the turn for the model to write.
    """
    msgs = [
        {"role": "system", "content": self.system(kind, reasoning)},
        {"role": "user", "content": text},
    ]
    if answer:
      msgs.append({"role": "assistant", "content": self.embed_suffix})
    return msgs
