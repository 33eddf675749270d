"""Tokenizer with the chat template and the `<|embed_token|>` special token."""

from __future__ import annotations

from typing import Optional, Sequence

import jinja2
import jinja2.sandbox
import tokenizers

from search_r3_jax.core.prompts import EMBED_TOKEN
from search_r3_jax.core.prompts import PromptConfig

# Fallback for checkpoints without a template: the ChatML layout that both
# SmolLM2 and Qwen2.5 use.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_STOP_CANDIDATES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")


def _raise(message):
  raise jinja2.TemplateError(message)


class Tokenizer:
  """A `tokenizers.Tokenizer` plus chat template, stop ids and the embed id.

  Attributes:
    embed_token_id: id of `<|embed_token|>`.
    eos_ids: ids that end an assistant turn.
    pad_id: id used for padding (never attended).
  """

  def __init__(
      self,
      tok: tokenizers.Tokenizer,
      chat_template: Optional[str],
      eos_token: Optional[str] = None,
      bos_token: Optional[str] = None,
      pad_token: Optional[str] = None,
      embed_token_id: Optional[int] = None,
  ):
    self.tok = tok
    self.bos_token = bos_token
    self.eos_token = eos_token
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True
    )
    env.globals["raise_exception"] = _raise
    self.chat_template = chat_template or CHATML_TEMPLATE
    self._template = env.from_string(self.chat_template)
    if tok.token_to_id(EMBED_TOKEN) is None:
      if embed_token_id is not None:
        raise ValueError(
            f"{EMBED_TOKEN} is absent from the tokenizer but an "
            f"id ({embed_token_id}) was given for it"
        )
      tok.add_special_tokens(
          [tokenizers.AddedToken(EMBED_TOKEN, special=True, normalized=False)]
      )
    self.embed_token_id = tok.token_to_id(EMBED_TOKEN)
    if embed_token_id is not None and embed_token_id != self.embed_token_id:
      raise ValueError(
          f"{EMBED_TOKEN} has id {self.embed_token_id}, "
          f"expected {embed_token_id}"
      )
    eos = {tok.token_to_id(t) for t in (eos_token, *_STOP_CANDIDATES) if t}
    self.eos_ids = tuple(sorted(i for i in eos if i is not None))
    if not self.eos_ids:
      raise ValueError("the tokenizer has no end-of-turn token")
    pad = tok.token_to_id(pad_token) if pad_token else None
    self.pad_id = pad if pad is not None else self.eos_ids[0]

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (embed token included)."""
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [
        e.ids
        for e in self.tok.encode_batch(list(texts), add_special_tokens=False)
    ]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(
      self, messages: list[dict], add_generation_prompt: bool = False
  ) -> str:
    return self._template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token or "",
        eos_token=self.eos_token or "",
    )

  def _head_body_tail(
      self,
      prompts: PromptConfig,
      kind: str,
      text: str,
      reasoning: bool,
      max_text_tokens: Optional[int],
  ):
    marker = "\x00TEXT\x00"
    msgs = prompts.messages(kind, marker, reasoning=reasoning, answer=False)
    rendered = self.apply_chat_template(msgs, add_generation_prompt=True)
    if rendered.count(marker) != 1:
      raise ValueError(
          "the chat template does not render the user message " "verbatim"
      )
    head, tail = rendered.split(marker)
    body = self.encode(text)
    if max_text_tokens is not None:
      body = body[:max_text_tokens]
    return self.encode(head) + body + self.encode(tail)

  def training_example(
      self,
      prompts: PromptConfig,
      kind: str,
      text: str,
      max_text_tokens: Optional[int] = None,
  ) -> tuple[list[int], int, int]:
    """A full no-reasoning turn for supervised training.

    Returns:
      (ids, response_start, embed_pos): the prompt followed by the assistant
      turn `prompts.embed_suffix` and the end-of-turn token; the index of the
      first response token; the index of `<|embed_token|>`.
    """
    ids = self._head_body_tail(prompts, kind, text, False, max_text_tokens)
    response = self.encode(prompts.embed_suffix) + [self.end_of_turn_id]
    embed_pos = len(ids) + response.index(self.embed_token_id)
    return ids + response, len(ids), embed_pos

  def reasoning_example(
      self,
      prompts: PromptConfig,
      text: str,
      analysis: str,
      max_text_tokens: Optional[int] = None,
      max_analysis_tokens: Optional[int] = None,
  ) -> tuple[list[int], int, int]:
    """A full reasoning turn for supervised training: the reasoning query
    prompt, then the assistant turn `analysis` + " " + `prompts.embed_suffix`
    and the end-of-turn token (the layout `reasoning_row` gives a rollout
    that wrote this analysis).

    Returns:
      (ids, response_start, embed_pos), as `training_example`.
    """
    ids = self._head_body_tail(prompts, "query", text, True, max_text_tokens)
    body = self.encode(analysis.strip())
    if self.embed_token_id in body:
      raise ValueError(
          f"the analysis {analysis!r} contains {EMBED_TOKEN}; the token "
          "belongs to the embed suffix alone"
      )
    if max_analysis_tokens is not None:
      body = body[:max_analysis_tokens]
    suffix = self.encode(" " + prompts.embed_suffix) + [self.end_of_turn_id]
    embed_pos = len(ids) + len(body) + suffix.index(self.embed_token_id)
    return ids + body + suffix, len(ids), embed_pos

  @property
  def end_of_turn_id(self) -> int:
    """The token that closes an assistant turn (the eos token)."""
    tid = self.tok.token_to_id(self.eos_token) if self.eos_token else None
    return tid if tid is not None else self.eos_ids[0]

  def embedding_prompt(
      self,
      prompts: PromptConfig,
      kind: str,
      text: str,
      reasoning: bool = False,
      max_text_tokens: Optional[int] = None,
  ) -> list[int]:
    """Token ids of one query/document prompt.

    Without reasoning the ids end with the embed token (the assistant turn is
    `prompts.embed_suffix`, cut after the token). With reasoning they end with
    the assistant header, for the model to continue. The text is tokenized on
    its own so that `max_text_tokens` truncates the text, never the template.
    """
    ids = self._head_body_tail(prompts, kind, text, reasoning, max_text_tokens)
    if not reasoning:
      ids += embed_suffix_ids(self, prompts)
    return ids


def embed_suffix_ids(
    tokenizer, prompts: PromptConfig, leading_space: bool = False
) -> list[int]:
  """Ids of `prompts.embed_suffix` cut after `<|embed_token|>`: the end of
  a no-reasoning prompt, or (with `leading_space`) what ends an analysis
  that did not emit the token."""
  ids = tokenizer.encode((" " if leading_space else "") + prompts.embed_suffix)
  return ids[: ids.index(tokenizer.embed_token_id) + 1]


def reasoning_row(
    prompt: Sequence[int],
    response: Sequence[int],
    *,
    embed_token_id: int,
    end_ids: Sequence[int],
    suffix: Sequence[int],
) -> tuple[list[int], bool]:
  """The token sequence a reasoning query is embedded from, one definition
  for evaluation (`Policy.encode_queries`) and training (`grpo_batch`).

  A response that ends with `<|embed_token|>` is kept as it is. One that
  ended otherwise (an end-of-turn/eos id, or the token budget) loses its
  trailing end ids and gets `suffix` (the embed suffix, ending with the
  token) appended, so the analysis runs straight into
  "The embedding is <|embed_token|>".

  Returns:
    (prompt + kept response [+ suffix], emitted); the embedding is taken at
    the row's last token.
  """
  response = [int(x) for x in response]
  if response and response[-1] == embed_token_id:
    return [int(x) for x in prompt] + response, True
  if not suffix or int(suffix[-1]) != embed_token_id:
    raise ValueError(
        f"embed suffix {list(suffix)} does not end with the embed token "
        f"{embed_token_id}"
    )
  ends = {int(x) for x in end_ids}
  while response and response[-1] in ends:
    response.pop()
  return [int(x) for x in prompt] + response + [int(x) for x in suffix], False
